"""Stage checkpoints among an MLflow run's artifacts: ``checkpoints/<stage>/step-NNNNNNN/``
(the folder of :mod:`training.checkpoints`: safetensors and JSON).

Rank 0 of a stage logs each checkpoint as it is written, in the background
(:meth:`training.mlflow.run_tracker.RunTracker.log_checkpoint`), and a stage never waits
out a tracking outage for them. After each stage the driver makes sure its final
checkpoint is there (:func:`checkpoint_logged`, then a re-upload from storage if need
be), so an outage costs at most intermediate checkpoints. Retention keeps the newest
``keep_last`` folders of a stage (:func:`prune_checkpoints`).
"""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from training.checkpoints import (
    CONFIG_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
)

REQUIRED_FILES = {STATE_FILE, CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE}


def checkpoint_logged(client: MlflowClient, run_id: str, artifact_path: str) -> bool:
    """Whether every file a checkpoint needs is under ``artifact_path`` of the run."""
    names = {f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(run_id, artifact_path)}
    return REQUIRED_FILES.issubset(names)


def logged_checkpoints(client: MlflowClient, run_id: str, stage_path: str) -> list[str]:
    """The checkpoint folders under ``stage_path`` (``checkpoints/<stage>``) that hold
    files, oldest first. (A store with real folders, such as SeaweedFS, may keep a
    deleted checkpoint's folder, empty.)"""
    folders = sorted(f.path for f in client.list_artifacts(run_id, stage_path) if f.is_dir)
    return [path for path in folders if client.list_artifacts(run_id, path)]


def prune_checkpoints(
    client: MlflowClient, tracking_uri: str, run_id: str, artifact_path: str, keep_last: int
) -> list[str]:
    """Delete the checkpoint folders beside ``artifact_path`` but the newest ``keep_last``
    (folder names sort by step); returns what was deleted."""
    folders = logged_checkpoints(client, run_id, artifact_path.rsplit("/", 1)[0])
    stale = folders[:-keep_last] if len(folders) > keep_last else []
    if stale:
        root = client.get_run(run_id).info.artifact_uri
        repository = get_artifact_repository(root, tracking_uri=tracking_uri)
        for path in stale:
            repository.delete_artifacts(path)
    return stale
