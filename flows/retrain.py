"""The retraining pipeline as Prefect flows: shard → train → evaluate and promote →
deploy → sample, with ``retrain`` running them in order. Each stage is a flow of its
own: runnable and deployable alone, and a child run of ``retrain`` in the Prefect UI.
The retries live on the tasks inside (``flows.tasks``)."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.events import emit_dataset_event
from flows.report import DatasetSummary, Endpoint, RetrainReport, report_markdown
from flows.retrain_config import DEFAULTS, RetrainConfig, ServeSettings, ShardSettings
from flows.tasks import (
    deploy,
    evaluate_and_promote,
    sample_grid,
    shard,
    train,
    use_dataset,
    warm_start_from_champion,
)
from training.evaluation.promotion import PromotionResult, require_val_split
from training.job import TrainedVersion, TrainJobConfig, default_local_store

__all__ = ["DEFAULTS", "RetrainConfig", "retrain"]


@flow(name="shard-dataset")
def shard_flow(
    source: str,
    dataset_url: str,
    options: ShardSettings = DEFAULTS.shard,
    announce: bool = True,
    ray_address: str | None = None,
) -> DatasetSummary:
    """Shard ``source`` to ``dataset_url`` unless it is up to date. With ``announce``,
    new shards are published as the event ``ldm.dataset.sharded``, which starts the
    deployments that have the new-dataset trigger (``retrain`` passes False). With
    ``options.engine`` ``ray``, shards are written on the cluster at ``ray_address``."""
    data = shard(source, dataset_url, options, ray_address)
    if announce and data.resharded:
        emit_dataset_event(dataset_url, data.fingerprint, data.counts)
    return data


@flow(name="train-model")
def train_flow(job: TrainJobConfig, ray_address: str | None = None) -> TrainedVersion:
    """Every training stage on Ray; registers the version as @candidate."""
    return train(job, ray_address)


@flow(name="evaluate-and-promote")
def promote_flow(config: RetrainConfig, tracking_uri: str, version: str) -> PromotionResult:
    """Evaluate ``version`` next to @champion and move the alias if it is better."""
    return evaluate_and_promote(config, tracking_uri, version)


@flow(name="deploy-endpoint")
def deploy_flow(
    serve: ServeSettings,
    model_name: str,
    tracking_uri: str,
    num_classes: int,
    grid_path: str,
    ray_address: str | None = None,
) -> Endpoint:
    """Deploy or update the endpoint following ``model_name@champion`` and sample every
    class through it."""
    app = serve.app.model_copy(
        update={"model_uri": f"models:/{model_name}@champion", "tracking_uri": tracking_uri}
    )
    url = deploy(app, model_name, serve.port, ray_address, serve.host)
    return Endpoint(url=url, grid=sample_grid(url, num_classes, serve.grid, grid_path))


@flow(name="retrain", log_prints=True)
def retrain(config: RetrainConfig = DEFAULTS, new_dataset: str | None = None) -> RetrainReport:
    """Shard the source, train on Ray, evaluate and promote, deploy the endpoint and
    sample every class through it. Leaves a markdown report as a Prefect artifact.

    ``new_dataset``: a dataset URL published elsewhere (the new-dataset trigger passes
    it); training uses it as it is instead of sharding ``config.source``.
    """
    store = default_local_store()
    dataset_url = (
        new_dataset or config.dataset_url or str(store / "data" / _dataset_name(config.source))
    )
    ray_address = config.ray_address or os.environ.get("RAY_ADDRESS") or None
    if new_dataset:
        data = use_dataset(new_dataset)
    else:
        data = shard_flow(
            config.source, dataset_url, config.shard, announce=False, ray_address=ray_address
        )
    require_val_split(dataset_url)  # promotion needs one: fail before training, not after
    job = config.train.job(dataset_url, run_prefix="retrain-")
    if config.warm_start.from_champion:
        job = warm_start_from_champion(job, config.warm_start.reuse_autoencoder)
    tracking_uri = job.tracking_uri
    trained = train_flow(job, ray_address)
    decision = promote_flow(config, tracking_uri, trained.version)
    endpoint = None
    if config.serve.enabled:
        out_dir = Path(config.out_dir) if config.out_dir else store / "retrain"
        grid_path = str(out_dir / f"{job.run_name}-samples.png")
        endpoint = deploy_flow(
            config.serve, job.model_name, tracking_uri, data.num_classes, grid_path, ray_address
        )
    report = RetrainReport(
        dataset=data,
        training=trained,
        promotion=decision,
        tracking_uri=tracking_uri,
        endpoint=endpoint,
    )
    create_markdown_artifact(key="retrain-report", markdown=report_markdown(report))
    return report


def _dataset_name(source: str) -> str:
    return Path(source.rstrip("/")).name.removesuffix(".npz") or "dataset"
