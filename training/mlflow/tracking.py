"""MLflow tracking for a training job: where it goes, its experiment, its params.

Only the driver and rank 0 of a Ray Train group call these; the tracking URI
travels in the job config, so a worker never reads it from its environment.
Logging that survives an outage of the server is :mod:`training.mlflow.run_tracker`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

# Run tags naming the dataset a run trained on: its manifest and the manifest's sha256
# (the lineage a served image's version leads back to).
DATASET_URL_TAG = "data.manifest_url"
DATASET_DIGEST_TAG = "data.manifest_sha256"
# Model version tag: the epsilon scaling b searched per sampler and step count
# (training.evaluation.eps_search), which the endpoint applies by default.
EPS_SCALING_TAG = "ldm.eps_scaling"


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
