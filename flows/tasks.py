"""The tasks of the retrain flows, each one step that talks to storage, Ray or MLflow.

Tasks that do I/O retry with backoff; what trying again cannot fix fails at once: a
ValueError (a bad config or unusable data), a permanent storage error (a missing
bucket, refused credentials), a non-finite loss.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data.storage import PermanentStorageError
from flows.report import DatasetSummary
from flows.retrain_config import GridSettings, RetrainConfig, ShardSettings
from serving.config import AppConfig
from training.evaluation.promotion import PromotionResult
from training.job import TrainedVersion, TrainJobConfig, default_local_store
from training.optimisation import NonFiniteLoss

BACKOFF = [2, 10, 30]


def _is_transient(task, task_run, state) -> bool:
    """Retry I/O failures, not what retrying cannot fix (see the module doc)."""
    return not isinstance(state.data, ValueError | PermanentStorageError | NonFiniteLoss)


io_task = task(
    retries=3, retry_delay_seconds=BACKOFF, retry_condition_fn=_is_transient, cache_policy=NO_CACHE
)


@io_task
def shard(
    source: str, dataset_url: str, settings: ShardSettings, ray_address: str | None = None
) -> DatasetSummary:
    """The dataset at ``dataset_url``; re-sharding is skipped when a manifest of the
    same source content and options is already there."""
    from data.shard import existing_dataset
    from flows.sharding import shard_where

    log = get_run_logger()
    options = settings.options()
    manifest = existing_dataset(source, dataset_url, options)
    if manifest is not None:
        log.info("dataset %s is up to date with %s: re-sharding skipped", dataset_url, source)
        return DatasetSummary.of(dataset_url, manifest, resharded=False)
    done = shard_where(
        source,
        dataset_url,
        options,
        engine=settings.engine,
        ray_address=ray_address,
        workers=settings.workers,
        log=log.info,
    )
    log.info(done.summary)
    return DatasetSummary.of(dataset_url, done.manifest, resharded=True)


@io_task
def use_dataset(dataset_url: str) -> DatasetSummary:
    """A dataset published elsewhere (``ldm shard``), taken as it is."""
    from data.manifest import load_manifest

    try:
        manifest = load_manifest(dataset_url)
    except FileNotFoundError as error:  # nothing to wait for: fail without retries
        raise ValueError(str(error)) from error
    get_run_logger().info("training on the published dataset %s", dataset_url)
    return DatasetSummary.of(dataset_url, manifest, resharded=False)


@io_task
def warm_start_from_champion(job: TrainJobConfig, reuse_autoencoder: bool) -> TrainJobConfig:
    """``job`` starting from the current ``@champion`` (pinned to its version, so that
    the run records which one), or as it is while there is no champion."""
    from mlflow import MlflowClient

    from training.mlflow.registry import alias_version

    log = get_run_logger()
    version = alias_version(MlflowClient(job.tracking_uri), job.model_name, "champion")
    if version is None:
        log.info("no %s@champion yet: training from scratch", job.model_name)
        return job
    log.info("warm start from %s version %s (@champion)", job.model_name, version)
    return job.model_copy(
        update={
            "init_from": f"models:/{job.model_name}/{version}",
            "reuse_autoencoder": reuse_autoencoder,
        }
    )


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=_is_transient, cache_policy=NO_CACHE)
def train(job: TrainJobConfig, ray_address: str | None = None) -> TrainedVersion:
    """Every stage on Ray: a Ray Job when ``ray_address`` is a dashboard URL, else in
    this process. A retry resumes from the checkpoints (same run name)."""
    from training.ray.submit import train_job

    return train_job(job, ray_address, log=get_run_logger().info)


@io_task
def evaluate_and_promote(config: RetrainConfig, tracking_uri: str, version: str) -> PromotionResult:
    from training.evaluation.promotion import promote

    cache = config.evaluator_cache or str(default_local_store() / "evaluators")
    result = promote(
        config.train.model_name,
        tracking_uri,
        cache,
        version=version,
        metric=config.promote_metric,
        min_improvement=config.min_improvement,
        settings=config.evaluation,
        progress=True,
    )
    get_run_logger().info(
        "v%s %s: %s", version, "promoted" if result.promoted else "kept", result.reason
    )
    return result


@io_task
def deploy(app: AppConfig, name: str, port: int, ray_address: str | None, host: str) -> str:
    """Deploy (or update) the Serve app ``name`` with ``app``; returns its URL."""
    from serving.deploy import deploy_app

    return deploy_app(app, name, port, ray_address, host=host)


@io_task
def sample_grid(url: str, num_classes: int, grid: GridSettings, out_path: str) -> str:
    """One sample of every class over HTTP, written as a PNG grid."""
    from serving.client import request_samples

    request = {"labels": list(range(num_classes)), "format": "png", **grid.model_dump()}
    reply = request_samples(url, request)
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(reply.body)
    return str(path)
