"""``ldm train --resume-from URI``: continue a stage of an earlier run from one of its
checkpoints, in a new run.

``URI`` is a checkpoint logged to MLflow (``runs:/RUN_ID/checkpoints/STAGE/step-N``)
or a checkpoint folder in storage (an absolute path or ``s3://``; a Ray Train
``checkpoint_*`` folder of an earlier run). The checkpoint names its stage, its step and
the MLflow run that wrote it; the stages before it are taken from that run (their final
checkpoints, logged to MLflow by every run), the stage itself continues from the
checkpoint's step with its optimiser, scheduler and EMA, and the stages after it train
as usual. Checkpoints read from MLflow are first copied into the new run's storage, so
Ray workers on any node read them the way they read their own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import ray.train
from mlflow import MlflowClient

from data import storage
from training.checkpoints import RUNS_CHECKPOINT_URI, checkpoint_artifact_path, load_checkpoint
from training.job import TrainJobConfig
from training.mlflow.checkpoint_artifacts import logged_checkpoints
from training.ray.starting_point import StartingPoint, with_budgets
from training.stages import STAGE_NAMES, StageName, get_stage

RESUMED_FROM_TAG = "ldm.resumed_from"


def plan_resume(job: TrainJobConfig) -> StartingPoint:
    """Read ``job.resume_from``, copy what is needed into the run's storage, and say
    where each stage starts. ValueError when the URI or what it names is not usable."""
    uri = job.resume_from or ""
    client = MlflowClient(job.tracking_uri)
    imported = f"{job.storage_url}/{job.run_name}/imported"
    match = RUNS_CHECKPOINT_URI.match(uri)
    if match:
        start = _import(client, match["run"], match["path"], imported)
    else:
        start = uri.rstrip("/")
    state, config = _read(start)
    run_id = match["run"] if match else state.run_id
    if run_id is None:
        raise ValueError(
            f"{uri} does not name the MLflow run that wrote it (a checkpoint from before "
            "runs were recorded in them): resume from runs:/RUN_ID/checkpoints/STAGE/step-N"
        )
    stage = get_stage(state.stage).name
    budget = get_stage(stage).training(job.model).steps
    if state.step >= budget:
        raise ValueError(
            f"{uri} is at step {state.step} of the {stage} stage, whose budget in this job "
            f"is {budget} steps: give the stage more steps (--config) to continue it"
        )
    finished = {}
    for earlier in STAGE_NAMES[: STAGE_NAMES.index(stage)]:
        path = _final_checkpoint(client, run_id, earlier, config)
        finished[earlier] = _import(client, run_id, path, imported)
    tags = {
        RESUMED_FROM_TAG: uri,
        f"{RESUMED_FROM_TAG}.run_id": run_id,
        f"{RESUMED_FROM_TAG}.stage": stage,
        f"{RESUMED_FROM_TAG}.step": str(state.step),
    }
    return StartingPoint(
        config=with_budgets(config, job.model),
        finished=finished,
        stage_options={stage: {"start_from": start}},
        tags=tags,
    )


def _read(uri: str):
    try:
        with ray.train.Checkpoint(uri).as_directory() as folder:
            return load_checkpoint(folder)
    except FileNotFoundError as error:
        raise ValueError(f"--resume-from {uri}: {error}") from None


def _final_checkpoint(client: MlflowClient, run_id: str, stage: StageName, config) -> str:
    steps = get_stage(stage).training(config).steps
    path = checkpoint_artifact_path(stage, steps)
    if path not in logged_checkpoints(client, run_id, f"checkpoints/{stage}"):
        raise ValueError(
            f"run {run_id} has no final {stage} checkpoint ({path}) in MLflow: the stages "
            "before the one resumed are taken from there"
        )
    return path


def _import(client: MlflowClient, run_id: str, artifact_path: str, root: str) -> str:
    """Copy a checkpoint logged to MLflow into storage under ``root``; its URL there."""
    target = f"{root}/{run_id}/{artifact_path}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=artifact_path,
                dst_path=tmp,
                tracking_uri=client.tracking_uri,
            )
        except Exception as error:
            raise ValueError(
                f"runs:/{run_id}/{artifact_path} could not be read from MLflow: {error}"
            ) from None
        files = [p for p in Path(local).rglob("*") if p.is_file()]
        if not files:
            raise ValueError(f"runs:/{run_id}/{artifact_path} holds no checkpoint")
        for path in files:
            storage.put_file(path, f"{target}/{path.relative_to(local).as_posix()}")
    return target
