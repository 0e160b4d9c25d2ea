"""The retraining pipeline as Prefect flows: shard → train → evaluate and promote →
deploy → sample, with ``retrain`` running them in order.

Tasks that talk to storage, MLflow or Ray retry with backoff; what trying again
cannot fix fails at once: a ValueError (a bad config or unusable data), a permanent
storage error (a missing bucket, refused credentials), a non-finite loss.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import Field, model_validator

from data.frozen import FrozenConfig
from data.manifest import Manifest, ShardOptions
from data.storage import PermanentStorageError
from flows.events import emit_dataset_event
from training.evaluation.promotion import require_val_split
from training.evaluation.scoring import EvaluationSettings
from training.job import ScalingSettings, TrainJobConfig, default_local_store
from training.mlflow.tracking import resolve_tracking_uri
from training.names import PresetName, PromotionMetric
from training.presets import get_preset

BACKOFF = [2, 10, 30]


class RetrainConfig(FrozenConfig):
    """Everything ``ldm retrain`` does, with embedded defaults for a laptop."""

    source: str = Field("mnist", description="'mnist', an image folder or an .npz, or s3://")
    dataset_url: str | None = Field(None, description="default: LDM_HOME/data/<name>")
    shard: ShardOptions = ShardOptions(channels=1)
    preset: PresetName = "demo"
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(2.0, gt=0)
    use_gpu: bool = False
    storage_url: str | None = Field(None, description="default: LDM_HOME/runs")
    ray_address: str | None = Field(
        None,
        description="default: RAY_ADDRESS, else a local Ray. A dashboard URL "
        "(http://head:8265) submits training as a Ray Job and deploys through the Serve "
        "REST API; a GCS address (head:6379) is joined from this process",
    )
    run_name: str | None = Field(None, description="default: retrain-<preset>-<time>")
    experiment: str = "ldm"
    model_name: str = "ldm"
    tracking_uri: str | None = None
    evaluator_cache: str | None = Field(None, description="default: LDM_HOME/evaluators")
    evaluation: EvaluationSettings = EvaluationSettings()
    promote_metric: PromotionMetric = "fd"
    min_improvement: float = Field(0.0, ge=0.0)
    serve: bool = True
    serve_host: str = Field(
        "127.0.0.1",
        description="HTTP bind address of the endpoint: this machine only by default; "
        "0.0.0.0 behind a proxy (see the README's 'Security and limits')",
    )
    port: int = Field(8000, ge=1, le=65535)
    out_dir: str | None = Field(None, description="default: LDM_HOME/retrain")

    @model_validator(mode="after")
    def _evaluable(self) -> RetrainConfig:
        if self.shard.val_fraction == 0:
            raise ValueError(
                "shard.val_fraction is 0, but evaluation and promotion need a val split: "
                "use --val-fraction 0.1 (or any value above 0)"
            )
        return self


DEFAULTS = RetrainConfig()


def _is_transient(task, task_run, state) -> bool:
    """Retry I/O failures, not what retrying cannot fix (see the module doc)."""
    from training.optimisation import NonFiniteLoss

    return not isinstance(state.data, ValueError | PermanentStorageError | NonFiniteLoss)


io_task = task(
    retries=3, retry_delay_seconds=BACKOFF, retry_condition_fn=_is_transient, cache_policy=NO_CACHE
)


@io_task
def shard(source: str, dataset_url: str, options: ShardOptions) -> dict[str, Any]:
    """The dataset at ``dataset_url``; re-sharding is skipped when a manifest of the
    same source content and options is already there."""
    from data.shard import existing_dataset, shard_dataset

    log = get_run_logger()
    manifest = existing_dataset(source, dataset_url, options)
    if manifest is not None:
        log.info("dataset %s is up to date with %s: re-sharding skipped", dataset_url, source)
        return _dataset_summary(dataset_url, manifest, resharded=False)
    report = shard_dataset(source, dataset_url, options, progress=False)
    log.info(report.summary())
    return _dataset_summary(dataset_url, report.manifest, resharded=True)


def _dataset_summary(url: str, manifest: Manifest, resharded: bool) -> dict[str, Any]:
    return {
        "url": url,
        "counts": manifest.counts,
        "resharded": resharded,
        "num_classes": manifest.num_classes,
        "fingerprint": manifest.fingerprint,
    }


@io_task
def use_dataset(dataset_url: str) -> dict[str, Any]:
    """A dataset published elsewhere (``ldm shard``), taken as it is."""
    from data.manifest import load_manifest

    try:
        manifest = load_manifest(dataset_url)
    except FileNotFoundError as error:  # nothing to wait for: fail without retries
        raise ValueError(str(error)) from error
    get_run_logger().info("training on the published dataset %s", dataset_url)
    return _dataset_summary(dataset_url, manifest, resharded=False)


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=_is_transient, cache_policy=NO_CACHE)
def train(job: TrainJobConfig, ray_address: str | None = None) -> dict[str, Any]:
    """All three stages on Ray: a Ray Job when ``ray_address`` is a dashboard URL, else
    in this process. A retry resumes from the checkpoints (same run name)."""
    from training.ray.driver import result_record, run_training
    from training.ray.submit import is_job_address, submit_training

    if is_job_address(ray_address):
        return submit_training(job, ray_address, log=get_run_logger().info)
    return result_record(run_training(job, ray_address))


@io_task
def evaluate_and_promote(config: RetrainConfig, tracking_uri: str, version: str) -> dict:
    from training.evaluation.promotion import promote

    cache = config.evaluator_cache or str(default_local_store() / "evaluators")
    result = promote(
        config.model_name,
        tracking_uri,
        cache,
        version=version,
        metric=config.promote_metric,
        min_improvement=config.min_improvement,
        settings=config.evaluation,
    )
    get_run_logger().info(
        "v%s %s: %s", version, "promoted" if result.promoted else "kept", result.reason
    )
    return {
        "promoted": result.promoted,
        "reason": result.reason,
        "metrics": result.metrics,
        "champion_before": result.champion_before,
    }


@io_task
def deploy(
    model_name: str,
    tracking_uri: str,
    port: int,
    ray_address: str | None = None,
    host: str = "127.0.0.1",
) -> str:
    """Deploy (or update) the Serve app following ``@champion``; returns its URL."""
    from serving.config import AppConfig
    from serving.deploy import deploy_app

    config = AppConfig(
        model_uri=f"models:/{model_name}@champion",
        tracking_uri=tracking_uri,
        num_cpus=0.5,
        reload_interval_s=5.0,
    )
    return deploy_app(config, model_name, port, ray_address, host=host)


@io_task
def sample_grid(url: str, num_classes: int, out_path: str) -> str:
    """One sample of every class over HTTP, written as a PNG grid."""
    from serving.client import request_samples

    reply = request_samples(
        url,
        {
            "labels": list(range(num_classes)),
            "guidance_scale": 2.0,
            "seed": 0,
            "sampler": "ddpm",
            "steps": 100,
            "format": "png",
        },
    )
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(reply.body)
    return str(path)


# Each stage is a flow of its own: runnable and deployable alone, and a child run of
# `retrain` in the Prefect UI. The retries live on the tasks inside.


@flow(name="shard-dataset")
def shard_flow(
    source: str, dataset_url: str, options: ShardOptions = DEFAULTS.shard, announce: bool = True
) -> dict[str, Any]:
    """Shard ``source`` to ``dataset_url`` unless it is up to date. With ``announce``,
    new shards are published as the event ``ldm.dataset.sharded``, which starts the
    deployments that have the new-dataset trigger (``retrain`` passes False)."""
    data = shard(source, dataset_url, options)
    if announce and data["resharded"]:
        emit_dataset_event(dataset_url, data["fingerprint"], data["counts"])
    return data


@flow(name="train-model")
def train_flow(job: TrainJobConfig, ray_address: str | None = None) -> dict[str, Any]:
    """All three training stages on Ray; registers the version as @candidate."""
    return train(job, ray_address)


@flow(name="evaluate-and-promote")
def promote_flow(config: RetrainConfig, tracking_uri: str, version: str) -> dict[str, Any]:
    """Evaluate ``version`` next to @champion and move the alias if it is better."""
    return evaluate_and_promote(config, tracking_uri, version)


@flow(name="deploy-endpoint")
def deploy_flow(
    model_name: str,
    tracking_uri: str,
    port: int,
    num_classes: int,
    grid_path: str,
    ray_address: str | None = None,
    host: str = "127.0.0.1",
) -> dict[str, str]:
    """Deploy or update the endpoint following @champion and sample every class."""
    endpoint = deploy(model_name, tracking_uri, port, ray_address, host)
    return {"endpoint": endpoint, "grid": sample_grid(endpoint, num_classes, grid_path)}


@flow(name="retrain", log_prints=True)
def retrain(config: RetrainConfig = DEFAULTS, new_dataset: str | None = None) -> dict[str, Any]:
    """Shard the source, train on Ray, evaluate and promote, deploy the endpoint and
    sample every class through it. Leaves a markdown report as a Prefect artifact.

    ``new_dataset``: a dataset URL published elsewhere (the new-dataset trigger passes
    it); training uses it as it is instead of sharding ``config.source``.
    """
    store = default_local_store()
    tracking_uri = resolve_tracking_uri(store, config.tracking_uri)
    dataset_url = (
        new_dataset or config.dataset_url or str(store / "data" / _dataset_name(config.source))
    )
    run_name = config.run_name or f"retrain-{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    ray_address = config.ray_address or os.environ.get("RAY_ADDRESS") or None
    if new_dataset:
        data = use_dataset(new_dataset)
    else:
        data = shard_flow(config.source, dataset_url, config.shard, announce=False)
    require_val_split(dataset_url)  # promotion needs one: fail before training, not after
    job = TrainJobConfig(
        data_url=dataset_url,
        model=get_preset(config.preset),
        scaling=ScalingSettings(
            num_workers=config.workers,
            use_gpu=config.use_gpu,
            cpus_per_worker=config.cpus_per_worker,
            torch_threads=max(1, int(config.cpus_per_worker)),
        ),
        storage_url=config.storage_url or str(store / "runs"),
        run_name=run_name,
        experiment=config.experiment,
        model_name=config.model_name,
        tracking_uri=tracking_uri,
    )
    trained = train_flow(job, ray_address)
    decision = promote_flow(config, tracking_uri, trained["version"])
    report = {
        "dataset": data,
        "training": trained,
        "promotion": decision,
        "tracking_uri": tracking_uri,
        "model_name": config.model_name,
        "endpoint": None,
        "grid": None,
    }
    if config.serve:
        out_dir = Path(config.out_dir) if config.out_dir else store / "retrain"
        report |= deploy_flow(
            config.model_name,
            tracking_uri,
            config.port,
            data["num_classes"],
            str(out_dir / f"{run_name}-samples.png"),
            ray_address,
            config.serve_host,
        )
    create_markdown_artifact(key="retrain-report", markdown=report_markdown(report))
    return report


def _dataset_name(source: str) -> str:
    return Path(source.rstrip("/")).name.removesuffix(".npz") or "dataset"


def report_markdown(report: dict[str, Any]) -> str:
    """The run as a page: dataset, MLflow run, metrics, the decision, the endpoint."""
    training, promotion = report["training"], report["promotion"]
    version = training["version"]
    lines = [
        f"# Retrain: {report['model_name']} v{version}",
        "",
        f"- **Dataset**: `{report['dataset']['url']}` ({report['dataset']['counts']}; "
        f"{'re-sharded' if report['dataset']['resharded'] else 're-sharding skipped'})",
        f"- **MLflow run**: `{training['run_id']}` at `{report['tracking_uri']}`",
        f"- **Decision**: {'promoted to @champion' if promotion['promoted'] else 'kept'} "
        f"— {promotion['reason']}",
        f"- **Endpoint**: {report['endpoint'] or 'not deployed'}",
        f"- **Sample grid**: `{report['grid'] or 'none'}`",
        "",
        "| version | class consistency | fd | psnr | s / image |",
        "|---|---:|---:|---:|---:|",
    ]
    for v, m in promotion["metrics"].items():
        lines.append(
            f"| v{v} | {m['class_consistency']:.3f} | {m['fd']:.3f} | {m['psnr']:.2f} | "
            f"{m['seconds_per_image']:.3f} |"
        )
    return "\n".join(lines) + "\n"
