"""Request and response bodies of the sampling API.

A :class:`SampleRequest` is validated against :class:`RequestLimits`, passed as the
pydantic validation context: the app's limits plus the classes and timesteps of the
model version that will serve the request. Class names are resolved to ids here, so
a request that validates can always be sampled. :func:`describe_errors` turns a
``ValidationError`` into messages that name the field and what it allows.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from serving.sampler import SampleJob
from training.diffusion.exposure import EpsScalingDefaults
from training.names import SamplerName

ImageFormat = Literal["png", "json", "npy"]
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class RequestLimits:
    """What a request may ask of one model version."""

    class_names: tuple[str, ...]  # one per class id, index = id
    max_images: int
    max_steps: int  # already capped at the model's num_timesteps
    default_steps: int
    max_guidance_scale: float
    max_classifier_scale: float
    # the version's searched epsilon scaling, for requests that leave eps_scaling out
    eps_defaults: EpsScalingDefaults = EpsScalingDefaults({})

    @classmethod
    def for_model(
        cls,
        class_names: tuple[str, ...],
        num_classes: int,
        num_timesteps: int,
        max_images: int,
        max_steps: int,
        default_steps: int,
        max_guidance_scale: float,
        max_classifier_scale: float,
        eps_defaults: EpsScalingDefaults | None = None,
    ) -> RequestLimits:
        """Limits of the app intersected with what the model supports. A model saved
        without class names answers to ``"0"`` … ``"N-1"``."""
        names = class_names or tuple(str(i) for i in range(num_classes))
        steps = min(max_steps, num_timesteps)
        return cls(
            names,
            max_images,
            steps,
            min(default_steps, steps),
            max_guidance_scale,
            max_classifier_scale,
            eps_defaults or EpsScalingDefaults({}),
        )

    def allowed(self, field: str) -> str:
        """A sentence fragment saying which values ``field`` accepts."""
        n = len(self.class_names)
        names = ", ".join(repr(c) for c in self.class_names[:20])
        more = ", …" if n > 20 else ""
        return {
            "labels": f"a list of 1 to {self.max_images} class ids (0 to {n - 1}) or "
            f"class names ({names}{more})",
            "label": f"one class id (0 to {n - 1}) or class name ({names}{more})",
            "num_samples": f"an integer from 1 to {self.max_images}",
            "guidance_scale": f"a number from 0 to {self.max_guidance_scale:g}",
            "classifier_scale": f"a number from 0 to {self.max_classifier_scale:g}",
            "sampler": "'ddim', 'ddpm' or 'dpmpp_2m' (DPM-Solver++, good in 10 to 20 steps)",
            "steps": f"an integer from 1 to {self.max_steps}",
            "eta": "a number from 0 to 1 (DDIM only)",
            "eps_scaling": "a number from 0.5 to 2 (b of λ_t = b + k·t/T; 1 is off)",
            "eps_scaling_slope": "a number from -1 to 1 (k of λ_t = b + k·t/T; 0 is off)",
            "seed": f"an integer from 0 to {MAX_SEED}",
            "format": "'png' (one grid), 'json' (base64 PNG per image) or 'npy'",
        }.get(field, "see GET /v1/model for the fields and limits")

    def class_id(self, value: Any) -> int:
        """An int id or a class name → the id; ValueError saying what is allowed."""
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < len(self.class_names):
                return value
            raise ValueError(f"class id {value} is out of range 0 to {len(self.class_names) - 1}")
        if isinstance(value, str):
            if value in self.class_names:
                return self.class_names.index(value)
            raise ValueError(f"unknown class name {value!r}")
        raise ValueError(f"{value!r} is neither a class id (integer) nor a class name (string)")


# A class: its id, or its name as GET /v1/model lists it ("3" is a name, 3 an id).
ClassRef = Annotated[
    Any,
    WithJsonSchema(
        {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]},
        mode="validation",
    ),
]
REQUEST_EXAMPLES = [
    {"label": 3, "num_samples": 8, "guidance_scale": 3.0, "sampler": "dpmpp_2m", "steps": 20},
    {"labels": ["0", "1", "2"], "sampler": "ddim", "steps": 50, "seed": 7, "format": "json"},
]


def _limits(info: ValidationInfo) -> RequestLimits:
    if not isinstance(info.context, RequestLimits):
        raise TypeError("validate SampleRequest with context=RequestLimits(...)")
    return info.context


def _in_range(value: float, high: float) -> float:
    if not 0 <= value <= high:
        raise ValueError(f"{value:g} is outside 0 to {high:g}")
    return value


class SampleRequest(BaseModel):
    """``POST /v1/samples``. Give ``labels`` (one class per image) or ``label`` with
    ``num_samples``. JSON types are strict: ``"3"`` is a class name, never the number 3."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        allow_inf_nan=False,
        frozen=True,
        json_schema_extra={"examples": REQUEST_EXAMPLES},
    )

    labels: list[ClassRef] | None = Field(
        None, description="one class per image (ids or names); or give label + num_samples"
    )
    label: ClassRef | None = Field(None, description="one class for every image")
    num_samples: int | None = Field(None, description="images of label (default 1)")
    guidance_scale: float = Field(
        0.0, description="classifier-free guidance w: (1+w)·ε(x, c) − w·ε(x, ∅); 0 is off"
    )
    classifier_scale: float = Field(0.0, description="classifier guidance s; 0 is off")
    sampler: SamplerName = Field("ddim", description="the reverse process")
    steps: int | None = Field(None, description="denoising steps (default: the endpoint's)")
    eta: float = Field(0.0, description="DDIM's η: 0 deterministic, 1 DDPM-like noise")
    seed: int | None = Field(None, description="default: random, returned in the response")
    format: ImageFormat = Field(
        "png", description="png: one grid; json: base64 PNG per image; npy: the arrays"
    )
    # epsilon scaling (Ning et al. 2024): ε̂ / (b + k·t/T) against exposure bias
    eps_scaling: float | None = Field(
        None,
        description="b of λ_t = b + k·t/T, ε̂ / λ_t; 1 is off. Default: the b searched for "
        "this version, sampler and step count (GET /v1/model, eps_scaling_defaults), else 1",
    )
    eps_scaling_slope: float = Field(0.0, description="k of λ_t = b + k·t/T; 0 is off")

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[Any] | None, info: ValidationInfo) -> list[int] | None:
        limits = _limits(info)
        if value is None:
            return None
        if not 1 <= len(value) <= limits.max_images:
            raise ValueError(f"{len(value)} labels asked for, allowed 1 to {limits.max_images}")
        ids = []
        for position, item in enumerate(value):
            try:
                ids.append(limits.class_id(item))
            except ValueError as error:
                raise ValueError(f"labels[{position}]: {error}") from None
        return ids

    @field_validator("label")
    @classmethod
    def _label(cls, value: Any, info: ValidationInfo) -> int | None:
        return None if value is None else _limits(info).class_id(value)

    @field_validator("num_samples")
    @classmethod
    def _num_samples(cls, value: int | None, info: ValidationInfo) -> int | None:
        high = _limits(info).max_images
        if value is not None and not 1 <= value <= high:
            raise ValueError(f"{value} images asked for, allowed 1 to {high}")
        return value

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, value: float, info: ValidationInfo) -> float:
        return _in_range(value, _limits(info).max_guidance_scale)

    @field_validator("classifier_scale")
    @classmethod
    def _classifier(cls, value: float, info: ValidationInfo) -> float:
        return _in_range(value, _limits(info).max_classifier_scale)

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: int | None, info: ValidationInfo) -> int | None:
        high = _limits(info).max_steps
        if value is not None and not 1 <= value <= high:
            raise ValueError(f"{value} is outside 1 to {high}")
        return value

    @field_validator("eta")
    @classmethod
    def _eta(cls, value: float) -> float:
        return _in_range(value, 1.0)

    @field_validator("eps_scaling")
    @classmethod
    def _eps_scaling(cls, value: float | None) -> float | None:
        if value is not None and not 0.5 <= value <= 2.0:
            raise ValueError(f"{value:g} is outside 0.5 to 2")
        return value

    @field_validator("eps_scaling_slope")
    @classmethod
    def _eps_scaling_slope(cls, value: float) -> float:
        if not -1.0 <= value <= 1.0:
            raise ValueError(f"{value:g} is outside -1 to 1")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= MAX_SEED:
            raise ValueError(f"{value} is outside 0 to {MAX_SEED}")
        return value

    @model_validator(mode="after")
    def _one_way_to_name_classes(self, info: ValidationInfo) -> SampleRequest:
        if (self.labels is None) == (self.label is None):
            raise ValueError("give either 'labels' (one class per image) or 'label' (one class)")
        if self.labels is not None and self.num_samples is not None:
            raise ValueError("'num_samples' goes with 'label'; with 'labels' give one per image")
        if self.scaling_b(_limits(info)) + min(self.eps_scaling_slope, 0.0) <= 0:
            raise ValueError("epsilon scaling must stay positive: eps_scaling + eps_scaling_slope")
        return self

    def scaling_b(self, limits: RequestLimits) -> float:
        """The b this request is sampled with: its own, else the version's default."""
        if self.eps_scaling is not None:
            return self.eps_scaling
        return limits.eps_defaults.for_request(self.sampler, self.steps or limits.default_steps)

    def to_job(self, limits: RequestLimits) -> SampleJob:
        """The validated request as work for the sampler (defaults filled in)."""
        ids = self.labels if self.labels is not None else [self.label] * (self.num_samples or 1)
        return SampleJob(
            labels=tuple(ids),
            guidance_scale=self.guidance_scale,
            classifier_scale=self.classifier_scale,
            sampler=self.sampler,
            steps=self.steps or limits.default_steps,
            eta=self.eta if self.sampler == "ddim" else 0.0,
            seed=self.seed if self.seed is not None else secrets.randbelow(2**31),
            eps_scaling=self.scaling_b(limits),
            eps_scaling_slope=self.eps_scaling_slope,
        )


def describe_errors(error: ValidationError, limits: RequestLimits) -> list[dict[str, str]]:
    """One ``{"field", "message", "allowed"}`` per problem, in the order pydantic found them."""
    problems = []
    for item in error.errors(include_url=False):
        field = str(item["loc"][0]) if item["loc"] else "request"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = f"unknown field {field!r}"
            field = "request"
        allowed = (
            "the fields labels or label (+ num_samples), guidance_scale, classifier_scale, "
            "sampler, steps, eta, seed, format, eps_scaling, eps_scaling_slope"
            if field == "request"
            else limits.allowed(field)
        )
        problems.append({"field": field, "message": message, "allowed": allowed})
    return problems


# ---------------------------------------------------------------- responses (documented)
class ModelVersionInfo(BaseModel):
    """Which registered version made the images, and what it was trained on: the
    version's MLflow run and the sha256 of the dataset manifest that run read."""

    name: str
    version: str
    alias: str | None
    run_id: str | None = Field(None, description="the MLflow run that trained the version")
    dataset_url: str | None = Field(None, description="the manifest of its training data")
    dataset_digest: str | None = Field(None, description="sha256 of that manifest")

    def headers(self) -> dict[str, str]:
        """The same facts as response headers (every format carries them)."""
        headers = {"X-Model-Name": self.name, "X-Model-Version": self.version}
        optional = {
            "X-Model-Alias": self.alias,
            "X-Model-Run-Id": self.run_id,
            "X-Dataset-Digest": self.dataset_digest,
        }
        return headers | {k: v for k, v in optional.items() if v}


class BatchInfo(BaseModel):
    """How the request was sampled: its images joined the replica's running forwards, one
    per denoising step, beside the images of other requests (whatever their settings)."""

    sampler: str
    steps: int
    eta: float
    eps_scaling: float = Field(1.0, description="b of λ_t = b + k·t/T (ε̂ / λ_t)")
    eps_scaling_slope: float = Field(0.0, description="k of λ_t = b + k·t/T")
    forwards: int = Field(description="network forwards its images took part in")
    mean_rows_per_forward: float = Field(description="images per forward, all requests")
    max_rows_per_forward: int
    max_requests_per_forward: int = Field(description="most requests sharing one forward")
    queued_s: float = Field(description="from arrival to its first image's first step")


class SampleResponse(BaseModel):
    """The body of ``format: "json"``; PNG and NPY carry the same facts as headers."""

    model: ModelVersionInfo
    labels: list[int]
    class_names: list[str]
    seed: int
    guidance_scale: float
    classifier_scale: float
    batch: BatchInfo
    image_shape: list[int] = Field(description="[H, W, C] of each image")
    images: list[str] = Field(description="base64 PNG per image, in label order")
    elapsed_s: float = Field(description="from request arrival to images ready")
    sampling_s: float = Field(description="from its first step to its images decoded")
