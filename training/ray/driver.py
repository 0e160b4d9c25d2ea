"""The driver of a training job: runs the stages in one Ray Train worker group (whose
ranks cache the latents in between), and logs and registers the result in MLflow.

``python -m training.ray.driver CONFIG_URL`` runs a job from a JSON :class:`TrainJobConfig`
(a local path or ``s3://``), which is how a Ray Job submission starts it on a cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from data import storage
from data.manifest import Manifest, load_manifest, manifest_url
from data.reader import rank_shards
from training.checkpoints import checkpoint_artifact_path, load_checkpoint_uri
from training.config import LDMConfig
from training.job import (
    ScalingSettings,
    StageJob,
    TrainedVersion,
    TrainJobConfig,
    WorkerGroupJob,
)
from training.latent_diffusion import LatentDiffusion
from training.mlflow.checkpoint_artifacts import checkpoint_logged, prune_checkpoints
from training.mlflow.registry import log_model_version
from training.mlflow.run_tracker import retry_tracking
from training.mlflow.tracking import (
    DATASET_DIGEST_TAG,
    DATASET_URL_TAG,
    ensure_experiment,
    flatten,
    git_commit,
)
from training.optimisation import NonFiniteLoss
from training.progress import quiet_libraries
from training.ray.connection import connect_ray, started_local_ray
from training.ray.placement import Unplaceable, check_room
from training.ray.resume import plan_resume
from training.ray.starting_point import StartingPoint
from training.ray.warm_start import PARENT_VERSION_TAG, plan_warm_start
from training.ray.worker import KEEP_SCORE, checkpoint_uri, train_worker
from training.stages import STAGES, StageName, get_stage

logger = logging.getLogger(__name__)

RUN_NAME_TAG = "ldm.run_name"
PARAMS_PER_CALL = 100  # MLflow's limit for params in one log_batch
# MLflow stores a dataset digest in 36 characters; the profile and the run's
# data.manifest_sha256 tag hold all 64.
DATASET_DIGEST_CHARS = 36
# How often Ray Train's controller polls the workers (its default: 2 s). A poll is one
# small actor call; a stage's end is seen within it, so at the default a worker group
# waited 1 s on average at its end, and at its start. A value in the environment is kept.
HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = 0.25


@dataclass
class TrainResult:
    run_id: str
    model: LatentDiffusion
    model_version: ModelVersion
    checkpoints: dict[str, str]


def run_training(job: TrainJobConfig, ray_address: str | None = None) -> TrainResult:
    """Autoencoder → latent cache → denoiser → classifier → registered model version.

    Re-running a job with the same ``run_name`` and storage resumes each stage from
    its latest checkpoint and logs into the same MLflow run. A job with ``resume_from``
    or ``init_from`` starts from an earlier run's checkpoint or a registered version.
    """
    manifest = load_manifest(job.data_url)  # a wrong data URL fails before Ray starts
    quiet_libraries(job.verbose)
    config = job.model.for_data(
        manifest.image_size, manifest.channels, manifest.num_classes, manifest.class_names
    )
    job = job.model_copy(update={"model": config})
    # An unusable checkpoint or version fails before the run, and before Ray starts.
    start = _starting_point(job)
    if start is not None:  # its networks, this job's step budgets
        job = job.model_copy(update={"model": start.config})
    check_every_rank_is_fed(job, manifest, start.finished if start else {})
    connect_ray(ray_address)
    check_worker_room(job.scaling)  # workers no node can hold fail before the run
    run_id = _start_run(job)
    try:
        checkpoints, model, version = _train_and_register(job, run_id, start)
    except BaseException:
        # Marked FAILED (a re-run with the same name resumes it); never left RUNNING.
        with contextlib.suppress(Exception):
            MlflowClient(job.tracking_uri).set_terminated(run_id, "FAILED")
        raise
    return TrainResult(run_id, model, version, checkpoints)


def check_every_rank_is_fed(
    job: TrainJobConfig, manifest: Manifest, finished: Iterable[str]
) -> None:
    """Every stage still to train gives each rank its own shards and a full batch, so a
    dataset too small for the job fails before Ray starts, not in every worker. The
    latent cache has a shard for each training shard, with its samples, so the
    training split answers for the latent stages too."""
    for stage in STAGES:
        if stage.name in finished:
            continue
        training = stage.training(job.model)
        deal = (job.model.seed, 0, 0)  # the first epoch, as rank 0 sees it
        try:
            rank_shards(
                manifest,
                "train",
                job.scaling.num_workers,
                training.batch_size,
                deal,
                training.shard_sampling,
            )
        except ValueError as error:
            workers = job.scaling.num_workers
            raise ValueError(
                f"the {stage.name} stage cannot start on {workers} worker(s): {error}"
            ) from None


def check_worker_room(scaling: ScalingSettings) -> None:
    """:class:`Unplaceable` when no node of a cluster that cannot grow can hold the
    worker group; a warning when the nodes cannot hold it yet (Ray Train waits)."""
    need = {"CPU": scaling.cpus_per_worker} | ({"GPU": 1.0} if scaling.use_gpu else {})
    nodes = ray.nodes()
    problem = check_room(
        need,
        scaling.num_workers,
        scaling.placement_strategy,
        what="training worker",
        hint=_worker_settings_hint(scaling, nodes),
        nodes=nodes,
    )
    if problem:
        logger.warning("%s; Ray Train waits for the cluster to add nodes", problem)


def _worker_settings_hint(scaling: ScalingSettings, nodes: list[dict[str, Any]]) -> str:
    """The setting to change for workers the nodes cannot hold."""
    alive = [n.get("Resources") or {} for n in nodes if n.get("Alive")]
    most_cpus = max((res.get("CPU", 0.0) for res in alive), default=0.0)
    changes = []
    if scaling.use_gpu and not any(res.get("GPU", 0.0) >= 1 for res in alive):
        changes.append("train without --gpu")
    if scaling.cpus_per_worker > most_cpus:
        changes.append(f"set --cpus-per-worker to at most {most_cpus:g}")
    changes = changes or ["use fewer --workers"]
    if not started_local_ray():
        changes.append("start the cluster with larger nodes (ldm up --head-cpus, --worker-cpus)")
    return ", or ".join(changes)


def _starting_point(job: TrainJobConfig) -> StartingPoint | None:
    if job.resume_from:
        return plan_resume(job)
    if job.init_from:
        return plan_warm_start(job)
    return None


def _register_once(
    model: LatentDiffusion, job: TrainJobConfig, run_id: str, tags: dict[str, str]
) -> ModelVersion:
    """Log and register the model with ``tags``, or return the version an earlier
    attempt registered (a retry after a lost answer must not register it twice)."""
    client = MlflowClient(job.tracking_uri)
    registered = [
        found
        for found in client.search_model_versions(f"run_id = '{run_id}'")
        if found.name == job.model_name
    ]
    version = (
        registered[0]
        if registered
        else log_model_version(model, job.tracking_uri, run_id, job.model_name)
    )
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    return client.get_model_version(version.name, version.version) if tags else version


def _train_and_register(
    job: TrainJobConfig, run_id: str, start: StartingPoint | None = None
) -> tuple[dict[str, str], LatentDiffusion, ModelVersion]:
    checkpoints, config = _train_stages(job, run_id, start)
    for stage, uri in checkpoints.items():
        _log_final_checkpoint(job, run_id, stage, uri)
    model = assemble_model(checkpoints, config)
    budget = job.tracking.outage_budget_s
    tags = start.version_tags if start is not None else {}
    version = retry_tracking(
        lambda: _register_once(model, job, run_id, tags), "registering the model", budget
    )
    client = MlflowClient(job.tracking_uri)
    retry_tracking(lambda: client.set_terminated(run_id, "FINISHED"), "finishing the run", budget)
    return checkpoints, model, version


def _train_stages(
    job: TrainJobConfig, run_id: str, start: StartingPoint | None = None
) -> tuple[dict[str, str], LDMConfig]:
    """The stages of the table in order, in one worker group (one Ray Train job): the
    ranks cache the latents, by the trained autoencoder, before the first stage that
    trains on them. Returns the final checkpoint of each stage and the config they
    measured (the latent scale). From a ``start``, the stages it finished are taken as
    they are and the others start where it says (a checkpoint, initial weights)."""
    checkpoints: dict[str, str] = {}
    if start is not None:
        _tag_run(job, run_id, start.tags)
        checkpoints.update(start.finished)
    pending = [stage for stage in STAGES if stage.name not in checkpoints]
    latents_url = f"{_run_root(job)}/latents"
    options: dict[StageName, dict[str, Any]] = {}
    for stage in pending:
        options[stage.name] = dict(start.stage_options.get(stage.name, {})) if start else {}
        options[stage.name]["data_url"] = job.data_url
        if stage.inputs == "latents":
            options[stage.name] |= {
                "data_url": latents_url,
                "latents_from": job.data_url,
                "autoencoder_checkpoint": checkpoints.get("autoencoder"),  # None: trained here
            }
    if options:
        checkpoints.update(fit_stages(job, options, run_id))
    for stage in pending:
        if stage.finish is not None:  # what it measured travels in its checkpoint's config
            _, config = load_checkpoint_uri(checkpoints[stage.name])
            job = job.model_copy(update={"model": config})
    return checkpoints, job.model


def _tag_run(job: TrainJobConfig, run_id: str, tags: dict[str, str]) -> None:
    """The run records where it came from."""
    client = MlflowClient(job.tracking_uri)
    retry_tracking(
        lambda: client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()]),
        "tagging the run",
        job.tracking.outage_budget_s,
    )


def _log_final_checkpoint(job: TrainJobConfig, run_id: str, stage: StageName, uri: str) -> None:
    """The stage's final checkpoint in its MLflow run (rank 0 logged it unless the
    tracking server was down as the stage ended: then it is uploaded from storage here,
    after the last stage, so that no stage waits for MLflow), and the run's retention
    applied."""
    client = MlflowClient(job.tracking_uri)
    path = checkpoint_artifact_path(stage, get_stage(stage).training(job.model).steps)

    def ensure() -> None:
        if not checkpoint_logged(client, run_id, path):
            with ray.train.Checkpoint(uri).as_directory() as folder:
                client.log_artifacts(run_id, folder, path)
        if job.mlflow_checkpoints_kept is not None:
            prune_checkpoints(client, job.tracking_uri, run_id, path, job.mlflow_checkpoints_kept)

    retry_tracking(ensure, f"logging the final {stage} checkpoint", job.tracking.outage_budget_s)


def _run_root(job: TrainJobConfig) -> str:
    return f"{job.storage_url}/{job.run_name}"


def _start_run(job: TrainJobConfig) -> str:
    """The MLflow run of ``job.run_name``: the unfinished one to resume, or a new one
    (retried while the tracking server does not answer)."""
    return retry_tracking(
        lambda: _start_run_once(job), "starting the MLflow run", job.tracking.outage_budget_s
    )


def _start_run_once(job: TrainJobConfig) -> str:
    client = MlflowClient(job.tracking_uri)
    artifact_root = None
    if job.tracking_uri.startswith("sqlite:"):
        artifact_root = f"{job.storage_url}/mlflow-artifacts"
        if artifact_root.startswith("/"):
            artifact_root = f"file://{artifact_root}"
    experiment_id = ensure_experiment(client, job.experiment, artifact_root)
    found = client.search_runs(
        [experiment_id],
        f"tags.`{RUN_NAME_TAG}` = '{job.run_name}' and attributes.status != 'FINISHED'",
        max_results=1,
    )
    if found:  # resumed: running again, whatever an earlier attempt left
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    manifest_bytes = storage.read_bytes(manifest_url(job.data_url.rstrip("/")))
    run = client.create_run(
        experiment_id,
        run_name=job.run_name,
        tags={
            RUN_NAME_TAG: job.run_name,
            DATASET_URL_TAG: manifest_url(job.data_url.rstrip("/")),
            DATASET_DIGEST_TAG: _sha256(manifest_bytes),
            "git.commit": git_commit(),
            "ray.cluster_size": json.dumps(_cluster_size()),
        },
    )
    params = [
        Param(k, v)
        for k, v in flatten(job.model_dump(mode="json", exclude={"tracking_uri"})).items()
    ]
    for start in range(0, len(params), PARAMS_PER_CALL):
        client.log_batch(run.info.run_id, params=params[start : start + PARAMS_PER_CALL])
    client.log_inputs(run.info.run_id, [_dataset_input(job.data_url, manifest_bytes)])
    return run.info.run_id


def _dataset_input(data_url: str, manifest_bytes: bytes) -> DatasetInput:
    """The training dataset as the run's input (the MLflow UI's Datasets column): its
    manifest's URL, sha256 and a profile of splits and image format."""
    url = manifest_url(data_url.rstrip("/"))
    digest = _sha256(manifest_bytes)
    manifest = Manifest.model_validate_json(manifest_bytes)
    profile = {
        "sha256": digest,
        "counts": manifest.counts,
        "shards": len(manifest.shards),
        "image_size": manifest.image_size,
        "channels": manifest.channels,
        "classes": list(manifest.class_names),
        "fingerprint": manifest.fingerprint,
    }
    dataset = Dataset(
        name=url.removesuffix("/manifest.json").rsplit("/", 1)[-1],
        digest=digest[:DATASET_DIGEST_CHARS],
        source_type="s3" if url.startswith("s3://") else "local",
        source=json.dumps({"uri": url}),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


def fit_stage(
    job: TrainJobConfig, stage: StageName, data_url: str, run_id: str, **extra: Any
) -> str:
    """Run one stage as a TorchTrainer; returns the URI of its final checkpoint."""
    return fit_stages(job, {stage: {"data_url": data_url, **extra}}, run_id)[stage]


def worker_group_name(job: TrainJobConfig, stages: Iterable[str]) -> str:
    """The Ray Train run (and storage folder) of the worker group of ``stages``."""
    return "-".join((job.run_name, *stages))


def fit_stages(
    job: TrainJobConfig, options: dict[StageName, dict[str, Any]], run_id: str
) -> dict[StageName, str]:
    """Run stages in order in one worker group, as one TorchTrainer (``options``: each
    stage's :class:`StageJob` fields besides the job and run, its ``data_url`` among
    them); returns the URI of each one's final checkpoint. A re-run of the same stages
    resumes them from the group's latest checkpoint."""
    group = WorkerGroupJob(
        stages=tuple(
            StageJob(stage=stage, job=job, run_id=run_id, **fields)
            for stage, fields in options.items()
        )
    )
    scaling = job.scaling
    os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, str(HEALTH_CHECK_INTERVAL_S))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=group.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=worker_group_name(job, options),
            storage_path=job.storage_url,
            failure_config=FailureConfig(max_failures=job.max_failures),
            # each stage's final checkpoint (they outrank the others) and the newest
            checkpoint_config=CheckpointConfig(
                num_to_keep=len(options) + 1, checkpoint_score_attribute=KEEP_SCORE
            ),
            logging_config=LoggingConfig("INFO" if job.verbose else "WARNING"),
        ),
    )
    result = _fit(trainer, ", ".join(options))
    returned = result.return_value or {}
    if returned.get("nonfinite_step") is not None:
        raise NonFiniteLoss(returned["nonfinite_stage"], returned["nonfinite_step"])
    finals = {
        metrics.get("stage"): checkpoint_uri(checkpoint.path, job.storage_url)
        for checkpoint, metrics in result.best_checkpoints or []
        if metrics.get("final")
    }
    missing = [stage for stage in options if stage not in finals]
    if missing:
        raise RuntimeError(f"training the {', '.join(missing)} ended without a final checkpoint")
    return {stage: finals[stage] for stage in options}


# What a worker raises to say what to fix: the job stops with it as itself, so the
# command prints its message and the retrain flow retries it only where retrying can
# help (a StorageError that is not permanent).
STATED_FAILURES = (ValueError, storage.StorageError)


def stated_failure(failed: ray.train.WorkerGroupError) -> Exception | None:
    """The lowest failed rank's exception when every failed rank raised one that says
    what to fix; None when one of them is anything else (its traceback is the news)."""
    failures = [failed.worker_failures[rank] for rank in sorted(failed.worker_failures)]
    if failures and all(isinstance(f, STATED_FAILURES) for f in failures):
        return failures[0]
    return None


def _fit(trainer: TorchTrainer, stages: str) -> ray.train.Result:
    """``trainer.fit()`` where Ctrl-C means Ctrl-C. On SIGINT Ray Train aborts the run
    and calls ``sys.exit(0)`` from a handler it leaves installed: here that becomes a
    KeyboardInterrupt (a command exits 130, not 0) and the caller's handler comes back."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main else None
    try:
        return trainer.fit()
    except SystemExit as aborted:
        raise KeyboardInterrupt(f"training the {stages} was interrupted") from aborted
    except ray.train.WorkerGroupError as failed:
        stated = stated_failure(failed)
        if stated is None:
            raise
        raise stated from failed
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGINT, previous)


def assemble_model(checkpoints: dict[str, str], config: LDMConfig) -> LatentDiffusion:
    """The sampling model from the final checkpoints (EMA weights for the denoiser)."""
    model = LatentDiffusion.build(config)
    for stage in STAGES:
        state, _ = load_checkpoint_uri(checkpoints[stage.name])
        weights = state.ema if stage.keeps_ema and state.ema is not None else state.model
        stage.network(model).load_state_dict(weights)
    return model.eval()


def _cluster_size() -> dict[str, float]:
    resources = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return {"nodes": nodes, "CPU": resources.get("CPU", 0.0), "GPU": resources.get("GPU", 0.0)}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def result_record(result: TrainResult) -> TrainedVersion:
    """What a submitter reads back from a finished job (see ``training.ray.submit``)."""
    return TrainedVersion(
        run_id=result.run_id,
        model_name=result.model_version.name,
        version=str(result.model_version.version),
        checkpoints=result.checkpoints,
        parent_version=result.model_version.tags.get(PARENT_VERSION_TAG),
    )


def failure_record(error: Exception) -> dict[str, Any]:
    """What a Ray Job's driver leaves in its result file for a failure that retrying
    cannot fix (``training.ray.submit.raise_recorded_failure`` reads it)."""
    if isinstance(error, NonFiniteLoss):
        return {"nonfinite": {"stage": error.stage, "step": error.step}}
    if isinstance(error, Unplaceable):
        return {"unplaceable": str(error)}
    if isinstance(error, storage.PermanentStorageError):
        return {"permanent_storage": str(error)}
    return {"invalid": str(error)}  # a ValueError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.ray.driver",
        description="Run a training job from its JSON TrainJobConfig (local path or s3://).",
    )
    parser.add_argument("config_url")
    parser.add_argument("--result", help="also write the run id and model version here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    job = TrainJobConfig.model_validate_json(storage.read_bytes(args.config_url))
    try:
        result = run_training(job)
    except (NonFiniteLoss, ValueError, storage.PermanentStorageError) as error:
        if args.result:  # the submitter raises these as themselves and must not retry them
            storage.write_bytes(args.result, json.dumps(failure_record(error)).encode())
        raise
    if args.result:
        storage.write_bytes(args.result, result_record(result).model_dump_json().encode())
    print(f"registered {result.model_version.name} version {result.model_version.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
