"""The configuration of a training job and of each Ray Train stage it launches.

A :class:`StageJob` is the one argument a Ray Train worker reads: it names the
data, the model config, where to log, and how often to checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from data.frozen import FrozenConfig
from training.config import LDMConfig, StageConfig
from training.stages import StageName, get_stage


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
    torch_threads: int = Field(1, ge=1)


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


class TrainJobConfig(FrozenConfig):
    """One run of all three stages on one dataset."""

    data_url: str = Field(description="dataset folder / s3:// prefix or its manifest.json")
    model: LDMConfig
    scaling: ScalingSettings = ScalingSettings()
    storage_url: str = Field(description="checkpoints and latent shards go under here")
    run_name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    experiment: str = "ldm"
    model_name: str = "ldm"
    tracking_uri: str
    checkpoint_every: int = Field(200, ge=1)
    sample_every: int = Field(0, ge=0, description="steps between sample grids; 0: at the end")
    max_failures: int = Field(1, ge=-1)
    loader_workers: int = Field(1, ge=0)
    tracking: TrackingSettings = TrackingSettings()
    job_timeout_s: float = Field(
        86_400.0, gt=0, description="a training Ray Job still running by then is stopped"
    )

    _storage = field_validator("storage_url")(_check_storage)


class StageJob(FrozenConfig):
    """What one Ray Train worker of one stage needs; nothing else is read."""

    stage: StageName
    job: TrainJobConfig
    data_url: str = Field(description="images (autoencoder) or cached latents (others)")
    run_id: str
    autoencoder_checkpoint: str | None = None  # decodes sample grids of the denoiser

    @property
    def training(self) -> StageConfig:
        return get_stage(self.stage).training(self.job.model)
