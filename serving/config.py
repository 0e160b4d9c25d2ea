"""The typed arguments of the sampling app (``serve run serving.app:build_app k=v …``,
the ``args`` of ``infra/serve/serve_config.yaml``, or ``build_app({...})`` in Python).

Values given on the ``serve run`` command line arrive as strings; they are parsed
here (``num_replicas=2``, ``autoscaling_config='{"max_replicas": 4}'``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from data.frozen import FrozenConfig
from training.mlflow.model_uri import ModelRef, parse_model_uri

DEFAULT_MODEL_URI = "models:/ldm@champion"


class AutoscalingSettings(FrozenConfig):
    """Ray Serve autoscaling of the sampling deployment (replicas follow the load)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    # Replicas follow the network rows they hold (target_rows_per_replica, below); the
    # request count is a second rule for requests that have not reached a replica yet:
    # requests in flight per replica that Serve aims for, about max_ongoing_requests.
    target_ongoing_requests: float = Field(64.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)
    # The window Serve averages the replicas' load over, and how often they report it
    # (None: Serve's 10 s; Ray deprecates the field for RAY_SERVE_*_METRIC_PUSH_INTERVAL_S).
    look_back_period_s: float = Field(30.0, gt=0)
    metrics_interval_s: float | None = Field(None, gt=0)
    target_rows_per_replica: float | None = Field(
        None,
        gt=0,
        description="network rows (active and waiting) one replica should hold; more "
        "adds replicas (see serving.autoscaling); default max_rows_per_forward",
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed "
                f"max_replicas ({self.max_replicas})"
            )
        return self


class AppConfig(FrozenConfig):
    """Where the model comes from, how many replicas hold it, what each may use, and
    the limits a request must respect."""

    model_uri: str = DEFAULT_MODEL_URI
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else the sqlite "
        "file of 'ldm train' under LDM_HOME (or ./outputs)",
    )
    # ----------------------------------------------------------- replicas and resources
    num_replicas: int | Literal["auto"] | None = Field(
        None, description="fixed replica count; None: 1 unless autoscaling_config is set"
    )
    autoscaling_config: AutoscalingSettings | None = None
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions allowed)")
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when num_gpus > 0
    torch_threads: int | None = Field(None, ge=1, description="default: max(1, num_cpus)")
    autocast: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto",
        description="run the networks' forward under autocast to this dtype (the "
        "guidance and the samplers' updates stay float32); auto: bf16 on a CPU that "
        "computes it natively, float32 elsewhere (serving.engine.resolve_autocast); "
        "check a GPU model's images against 'off' with benchmarks/gpu_check.sh before "
        "turning it on there",
    )
    deterministic: bool = Field(
        True,
        description="deterministic kernels and full float32 on a GPU (no TF32), so the "
        "same request gives the same images every time; false allows TF32 and "
        "cuDNN's fastest algorithms",
    )
    batch_invariant: bool | None = Field(
        None,
        description="run every network forward at exactly max_rows_per_forward rows "
        "(padded), so an image never depends on what it is batched with, also on a GPU "
        "whose kernels change with the batch width; costs a full forward at every step, "
        "whatever the load; default: on for a GPU replica, off on the CPU",
    )
    cuda_graph: bool | None = Field(
        None,
        description="on a GPU replica with batch_invariant: replay the denoiser's "
        "forward and the decoder as CUDA graphs recorded at their one width (one launch "
        "per call instead of one per kernel); default: on for a GPU replica with "
        "batch_invariant",
    )
    # ----------------------------------------------------------- step-level batching
    max_rows_per_forward: int | None = Field(
        None,
        ge=1,
        le=65_536,
        description="network rows per denoising step, across requests (an image with "
        "classifier-free guidance counts twice); default 64 on CPU, 256 on GPU",
    )
    decode_width: int = Field(
        32,
        ge=1,
        le=4_096,
        description="images per decoder call; with batch_invariant the images of "
        "every request that finishes at one step are decoded together, padded to "
        "exactly this many a call, else each request's images on their own",
    )
    engine: Literal["process", "thread"] = Field(
        "process",
        description="where the sampling loop runs: a child process of the replica with "
        "its own interpreter (serving.engine), or a thread of the replica",
    )
    join_running: bool = Field(
        True,
        description="admit requests at every step; false: only when no chain is running "
        "(request-level batching, for comparison)",
    )
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="requests a replica holds at once; default 64"
    )
    max_queued_requests: int = Field(
        64,
        ge=-1,
        description="requests waiting for a replica; beyond it 503 with Retry-After (-1: no limit)",
    )
    retry_after_s: int = Field(2, ge=0, description="the Retry-After of a 503 for a full queue")
    request_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="a request not answered by then gets a 504"
    )
    # ----------------------------------------------------------- request limits
    max_images_per_request: int = Field(64, ge=1, le=4096)
    max_steps: int = Field(1000, ge=1)
    default_steps: int | None = Field(
        None, ge=1, description="steps of a request that gives none; default min(50, max_steps)"
    )
    max_guidance_scale: float = Field(50.0, ge=0)
    max_classifier_scale: float = Field(100.0, ge=0)
    max_evaluations_per_request: int = Field(
        16_384,
        ge=1,
        description="work budget: images × steps × passes (classifier-free "
        "guidance doubles, classifier guidance adds 2); a costlier request gets a 422",
    )
    # ----------------------------------------------------------- hot reload
    reload_interval_s: float = Field(
        30.0, ge=0, description="seconds between alias checks; 0 turns reload off"
    )

    @field_validator("model_uri")
    @classmethod
    def _check_model_uri(cls, uri: str) -> str:
        parse_model_uri(uri)
        return uri.strip()

    @field_validator("autoscaling_config", mode="before")
    @classmethod
    def _parse_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"autoscaling_config is not valid JSON: {error}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AppConfig:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("give num_replicas or autoscaling_config, not both")
        if isinstance(self.num_replicas, int) and self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1 or 'auto', got {self.num_replicas}")
        if self.default_steps is not None and self.default_steps > self.max_steps:
            raise ValueError(
                f"default_steps ({self.default_steps}) must not exceed max_steps ({self.max_steps})"
            )
        if self.cuda_graph and self.resolved_device != "cuda":
            raise ValueError("cuda_graph needs a GPU replica: set num_gpus > 0 (--num-gpus)")
        if self.cuda_graph and not self.resolved_batch_invariant:
            raise ValueError("cuda_graph needs batch_invariant: a graph is recorded at one width")
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError("device='cuda' needs num_gpus > 0 (Serve must place it on a GPU)")
        return self

    @property
    def model_ref(self) -> ModelRef:
        return parse_model_uri(self.model_uri)

    @property
    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if self.num_gpus > 0 else "cpu"
        return self.device

    @property
    def resolved_batch_invariant(self) -> bool:
        """``batch_invariant``, by default on for a GPU replica: on a GPU the kernels
        change with the batch width, and a padded step replayed as a CUDA graph was
        faster than the unpadded eager one at every load measured (RESULTS.md)."""
        if self.batch_invariant is None:
            return self.resolved_device == "cuda"
        return self.batch_invariant

    @property
    def resolved_cuda_graph(self) -> bool:
        """``cuda_graph``, by default on wherever the batch is invariant on a GPU."""
        if self.cuda_graph is None:
            return self.resolved_device == "cuda" and self.resolved_batch_invariant
        return self.cuda_graph

    @property
    def store_device(self) -> str:
        """Where the replica loads a version: the CPU when a child process samples it
        (the engine moves its copy to the device), else the device."""
        return "cpu" if self.engine == "process" else self.resolved_device

    def engine_settings(self) -> Any:  # serving.engine.EngineSettings; imports torch
        from serving.engine import EngineSettings

        return EngineSettings(
            max_rows_per_forward=self.resolved_max_rows_per_forward,
            join_running=self.join_running,
            autocast=self.autocast,
            torch_threads=self.resolved_torch_threads,
            device=self.resolved_device,
            process=self.engine == "process",
            batch_invariant=self.resolved_batch_invariant,
            cuda_graph=self.resolved_cuda_graph,
            deterministic=self.deterministic,
            decode_width=self.decode_width,
        )

    @property
    def resolved_torch_threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))

    @property
    def resolved_default_steps(self) -> int:
        return self.default_steps or min(50, self.max_steps)

    @property
    def resolved_max_rows_per_forward(self) -> int:
        return self.max_rows_per_forward or (256 if self.resolved_device == "cuda" else 64)

    @property
    def resolved_max_ongoing_requests(self) -> int:
        # Requests waiting for rows are held by the replica's scheduler, not by Serve.
        return self.max_ongoing_requests or 64

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options`` for these settings."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.resolved_max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": self.retry_after_s},
        }
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.serve_autoscaling_config()
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options

    def serve_autoscaling_config(self) -> dict[str, Any]:
        """Serve's ``autoscaling_config``, with the policy that counts waiting work."""
        from serving.autoscaling import POLICY_PATH

        settings = self.autoscaling_config
        if settings is None:
            raise ValueError("this app has no autoscaling_config")
        target = settings.target_rows_per_replica or self.resolved_max_rows_per_forward
        options = settings.model_dump(exclude_none=True, exclude={"target_rows_per_replica"})
        options["policy"] = {
            "policy_function": POLICY_PATH,
            "policy_kwargs": {"target_rows_per_replica": target},
        }
        return options
