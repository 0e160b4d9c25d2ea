"""MLflow tracking for a training job: where it goes, the run, metrics and sample grids.

Only the driver and rank 0 of a Ray Train group call these; the tracking URI
travels in the job config, so a worker never reads it from its environment.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric


def resolve_tracking_uri(local_store: Path, explicit: str | None = None) -> str:
    """``explicit``, else ``MLFLOW_TRACKING_URI``, else a sqlite file in ``local_store``.

    Relative sqlite paths are made absolute: Ray Train workers change directory.
    """
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        local_store.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(local_store / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """The id of experiment ``name``, created with ``artifact_root`` when new.

    With a database backend and no tracking server, MLflow would otherwise put
    artifacts in ``./mlruns`` of whatever directory the process runs in.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → ``{"denoiser.model_channels": "48", …}`` for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = str(value)
    return flat


def git_commit() -> str:
    """The commit of the code that runs, or ``unknown`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class RunTracker:
    """Logs to one existing MLflow run, batching each step's metrics in one call."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """uint8 [H, W] or [H, W, C] as a PNG artifact of the run."""
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
