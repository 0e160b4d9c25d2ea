"""The configuration of a training job and of each Ray Train stage it launches.

A :class:`WorkerGroupJob` is the one argument a Ray Train worker reads: the stages its
worker group trains, in order, each a :class:`StageJob` that names the data, the model
config, where to log, and how often to checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from data.frozen import FrozenConfig
from training.config import LDMConfig, StageConfig
from training.names import PresetName
from training.stages import StageName, get_stage

RUN_NAME = r"^[A-Za-z0-9._-]+$"


def default_local_store() -> Path:
    """Where runs, checkpoints and the default MLflow database live without a cluster:
    ``LDM_HOME``, else ``./outputs`` (absolute)."""
    return Path(os.environ.get("LDM_HOME") or "outputs").resolve()


class ScalingSettings(FrozenConfig):
    """How many Ray Train workers a stage uses and what each one holds."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # torch intra-op threads per worker; more threads than cores per worker slows CPUs down.
    torch_threads: int = Field(1, ge=1, description="default: the worker's CPUs (at least 1)")

    @model_validator(mode="before")
    @classmethod
    def _threads_follow_cpus(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("torch_threads") is not None:
            return data
        cpus = data.get("cpus_per_worker", 1.0)
        finite = isinstance(cpus, int | float) and math.isfinite(cpus)
        return {**data, "torch_threads": max(1, int(cpus)) if finite else 1}


class TrackingSettings(FrozenConfig):
    """How the training job rides out a tracking server that does not answer: rank 0
    buffers its logging and the driver retries, for up to ``outage_budget_s``."""

    outage_budget_s: float = Field(1800.0, gt=0, description="longest MLflow outage survived")
    request_timeout_s: int = Field(30, ge=1, description="one MLflow HTTP request, at most")
    request_retries: int = Field(3, ge=0, description="MLflow's own retries of one request")

    def apply_to_client(self) -> None:
        """Set MLflow's HTTP client settings in this process (a Ray worker's own)."""
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(self.request_timeout_s)
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(self.request_retries)
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"


def _check_storage(url: str) -> str:
    if not (url.startswith("s3://") or url.startswith("/")):
        raise ValueError(
            f"storage must be an absolute path or s3://bucket/prefix, got {url!r} "
            "(Ray Train workers change directory, so relative paths break)"
        )
    return url.rstrip("/")


class JobSettings(FrozenConfig):
    """The choices of a training job that need no resolving: how it scales, where it is
    tracked and registered, how often it checkpoints, how long it may take."""

    scaling: ScalingSettings = ScalingSettings()
    experiment: str = "ldm"
    model_name: str = "ldm"
    checkpoint_every: int = Field(200, ge=1)
    mlflow_checkpoints: str = Field(
        "last:2",
        pattern=r"^(all|final|last:[1-9][0-9]*)$",
        description="checkpoints logged to the MLflow run, per stage: 'last:K' keeps the "
        "K newest (the final one among them), 'final' only the final one, 'all' every one",
    )
    sample_every: int = Field(0, ge=0, description="steps between sample grids; 0: at the end")
    max_failures: int = Field(1, ge=-1)
    resume_from: str | None = Field(
        None,
        description="continue a stage from this checkpoint, in a new run: "
        "runs:/RUN_ID/checkpoints/STAGE/step-N or a checkpoint folder in storage",
    )
    init_from: str | None = Field(
        None,
        description="start every network from this registered version's weights "
        "(models:/NAME@ALIAS or models:/NAME/VERSION) and fine-tune it for the job's "
        "step budgets, in a new run",
    )
    reuse_autoencoder: bool = Field(
        False,
        description="with init_from: keep its autoencoder and latent scale as they are "
        "and skip the autoencoder stage (the data's image size and channels must match)",
    )
    loader_workers: int = Field(1, ge=0)
    loader_memory_mb: int = Field(
        256,
        ge=0,
        description="a rank whose whole training split decodes into this many MiB reads "
        "it once and serves every later epoch from memory, in the same order (0: stream "
        "the shards every epoch)",
    )
    tracking: TrackingSettings = TrackingSettings()
    job_timeout_s: float = Field(
        86_400.0, gt=0, description="a training Ray Job still running by then is stopped"
    )
    verbose: bool = Field(
        False, description="show Ray Train's and MLflow's own INFO logs beside the progress"
    )

    @field_validator("resume_from")
    @classmethod
    def _check_resume_from(cls, uri: str | None) -> str | None:
        from training.checkpoints import RUNS_CHECKPOINT_URI

        if uri is None or RUNS_CHECKPOINT_URI.match(uri) or uri.startswith(("s3://", "/")):
            return uri
        if uri.startswith("models:/"):
            raise ValueError(
                f"{uri} is a registered model: its weights, not a stage's training state. "
                "Resume from a checkpoint of its run (runs:/RUN_ID/checkpoints/STAGE/step-N; "
                "the version's run id is in the registry)"
            )
        raise ValueError(
            f"resume_from must be runs:/RUN_ID/checkpoints/STAGE/step-NNNNNNN or a "
            f"checkpoint folder (an absolute path or s3://), got {uri!r}"
        )

    @field_validator("init_from")
    @classmethod
    def _check_init_from(cls, uri: str | None) -> str | None:
        from training.mlflow.model_uri import parse_model_uri

        if uri is None:
            return uri
        if uri.startswith("runs:/"):
            raise ValueError(
                f"{uri} is a run's checkpoint: continue it with resume_from (--resume-from); "
                "init_from takes a registered version, models:/NAME@ALIAS or models:/NAME/VERSION"
            )
        return parse_model_uri(uri, "a registered model URI").uri

    @model_validator(mode="after")
    def _one_start(self) -> JobSettings:
        if self.init_from and self.resume_from:
            raise ValueError(
                "give init_from (start from a registered version's weights) or resume_from "
                "(continue a stage from its checkpoint), not both"
            )
        if self.reuse_autoencoder and not self.init_from:
            raise ValueError(
                "reuse_autoencoder keeps the autoencoder of the version named by init_from: "
                "give init_from (--init-from models:/NAME@champion) too"
            )
        return self

    def logs_checkpoint(self, final: bool) -> bool:
        """Whether a checkpoint goes to the MLflow run (all but 'final' log every one)."""
        return final or self.mlflow_checkpoints != "final"

    @property
    def mlflow_checkpoints_kept(self) -> int | None:
        """How many of a stage's checkpoints the MLflow run keeps; None: all."""
        if self.mlflow_checkpoints == "all":
            return None
        if self.mlflow_checkpoints == "final":
            return 1
        return int(self.mlflow_checkpoints.split(":", 1)[1])


class TrainSettings(JobSettings):
    """A training job as a user gives it (``ldm train``'s options, a retrain config's
    ``train``): a preset or a model config, and where it goes when the defaults do not
    do. :meth:`job` resolves it against a dataset."""

    preset: PresetName = "demo"
    model: LDMConfig | None = Field(
        None,
        description="a model config instead of the preset; the fields it leaves out are the "
        "preset's (its own 'preset' field's, else this one's)",
    )
    storage_url: str | None = Field(None, description="default: LDM_HOME/runs")
    run_name: str | None = Field(
        None, pattern=RUN_NAME, description="the same name resumes; default: PRESET-DATE-TIME"
    )
    tracking_uri: str | None = Field(
        None, description="default: MLFLOW_TRACKING_URI, else sqlite under LDM_HOME"
    )

    _storage = field_validator("storage_url")(lambda url: url and _check_storage(url))

    @model_validator(mode="before")
    @classmethod
    def _model_over_preset(cls, data: Any) -> Any:
        """A ``model`` mapping gives what differs from the preset (its own ``preset``
        field's, else this one's); the rest is the preset's."""
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            from training.presets import over_preset

            preset = data.get("preset", cls.model_fields["preset"].default)
            data = {**data, "model": over_preset(data["model"], str(preset))}
        return data

    def job(self, data_url: str, run_prefix: str = "") -> TrainJobConfig:
        """The job of these settings on ``data_url``, the defaults resolved here (the
        local store ``LDM_HOME``, the tracking URI, a run name of the current time)."""
        from training.mlflow.tracking import resolve_tracking_uri
        from training.presets import get_preset

        store = default_local_store()
        model = self.model or get_preset(self.preset)
        chosen = {name: getattr(self, name) for name in JobSettings.model_fields}
        return TrainJobConfig(
            **chosen,
            data_url=data_url,
            model=model,
            storage_url=self.storage_url or str(store / "runs"),
            run_name=self.run_name
            or f"{run_prefix}{model.preset}-{time.strftime('%Y%m%d-%H%M%S')}",
            tracking_uri=resolve_tracking_uri(store, self.tracking_uri),
        )


class TrainJobConfig(JobSettings):
    """One run of every stage on one dataset, everything resolved: what the driver (and,
    through :class:`StageJob`, each Ray Train worker) reads."""

    data_url: str = Field(description="dataset folder / s3:// prefix or its manifest.json")
    model: LDMConfig
    storage_url: str = Field(description="checkpoints and latent shards go under here")
    run_name: str = Field(pattern=RUN_NAME)
    tracking_uri: str

    _storage = field_validator("storage_url")(_check_storage)


class TrainedVersion(FrozenConfig):
    """What a finished training job leaves: its MLflow run, the registered version
    (``@candidate``) and the final checkpoint of each stage. The driver writes it as
    JSON beside a submitted Ray Job; the submitter reads it back."""

    run_id: str
    model_name: str
    version: str
    checkpoints: dict[StageName, str]
    parent_version: str | None = None  # NAME/VERSION it was warm-started from


class StageJob(FrozenConfig):
    """What one Ray Train worker of one stage needs; nothing else is read."""

    stage: StageName
    job: TrainJobConfig
    data_url: str = Field(description="images (autoencoder) or cached latents (others)")
    run_id: str
    # the final checkpoint of the autoencoder (encodes the latents, decodes the
    # denoiser's grids); None: the one trained earlier in the same worker group
    autoencoder_checkpoint: str | None = None
    latents_from: str | None = None  # the images data_url caches, if not cached yet
    start_from: str | None = None  # a checkpoint to start from when the run has none yet
    init_weights: str | None = None  # the network's first weights (safetensors), not random

    @property
    def training(self) -> StageConfig:
        return get_stage(self.stage).training(self.job.model)


class WorkerGroupJob(FrozenConfig):
    """What the workers of one Ray Train ``fit()`` train: consecutive stages, in order,
    in one worker group (the driver runs every stage a job trains in one)."""

    stages: tuple[StageJob, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> WorkerGroupJob:
        names = [job.stage for job in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"a worker group trains each stage once, got {names}")
        return self
