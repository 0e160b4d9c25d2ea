"""What a training job spends outside its training steps: every stage in one Ray Train
worker group (the driver's way) against a ``fit()`` per stage with the latent cache
encoded by Ray tasks in between (the way before), side by side in one run.

    .venv/bin/python benchmarks/bench_worker_group.py [--steps 50] [--repeats 3]

Both run the `demo` networks for ``--steps`` steps a stage (so the training itself is
short and the same in both) on the built-in digits, 1 worker with 2 CPUs, from a fresh
storage folder each time, the order alternating. ``per-stage`` is three ``fit()``s with
Ray Train's default controller poll (2 s) and ``cache_latents``' Ray tasks; ``one
group`` is ``fit_stages`` over all three with the driver's poll (0.25 s). Reported: the
wall time of each (Ray already started, the MLflow run already made, as in a job) and
the time to the first logged metric of each stage.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlflow import MlflowClient

from data.manifest import ShardOptions
from data.shard import shard_dataset
from training.checkpoints import load_checkpoint_uri
from training.job import ScalingSettings, TrainJobConfig
from training.mlflow.tracking import ensure_experiment
from training.presets import get_preset
from training.ray import driver
from training.ray.connection import connect_ray
from training.ray.latent_cache import cache_latents

POLL_ENV = driver.HEALTH_CHECK_INTERVAL_ENV


def _job(root: Path, data: str, steps: int, name: str) -> TrainJobConfig:
    model = get_preset("demo")
    for stage in ("autoencoder", "denoiser", "classifier"):
        field = f"{stage}_training"
        training = getattr(model, field).model_copy(update={"steps": steps, "log_every": 10})
        model = model.model_copy(update={field: training})
    return TrainJobConfig(
        data_url=data,
        model=model,
        storage_url=str(root / "runs"),
        run_name=name,
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        scaling=ScalingSettings(num_workers=1, cpus_per_worker=2),
        checkpoint_every=steps,
        experiment="bench",
    )


def per_stage(job: TrainJobConfig, run_id: str) -> None:
    """The driver before: a fit() per stage, the cache by Ray tasks in between."""
    os.environ[POLL_ENV] = "2.0"  # Ray Train's default
    autoencoder = driver.fit_stage(job, "autoencoder", job.data_url, run_id)
    _, config = load_checkpoint_uri(autoencoder)
    job = job.model_copy(update={"model": config})
    latents = cache_latents(job.data_url, autoencoder, f"{job.storage_url}/latents", config)
    for stage in ("denoiser", "classifier"):
        driver.fit_stage(job, stage, latents, run_id, autoencoder_checkpoint=autoencoder)


def one_group(job: TrainJobConfig, run_id: str) -> None:
    """The driver now: every stage in one worker group, its ranks caching the latents."""
    os.environ[POLL_ENV] = str(driver.HEALTH_CHECK_INTERVAL_S)
    latents = f"{job.storage_url}/latents"
    options = {"autoencoder": {"data_url": job.data_url}}
    for stage in ("denoiser", "classifier"):
        options[stage] = {"data_url": latents, "latents_from": job.data_url}
    driver.fit_stages(job, options, run_id)


def _first_metrics(client: MlflowClient, run_id: str, started: float) -> dict[str, float]:
    """Seconds from the start to each stage's first logged metric (its worker is up)."""
    return {
        stage: (client.get_metric_history(run_id, f"{stage}/bf16_autocast")[0].timestamp / 1000)
        - started
        for stage in ("autoencoder", "denoiser", "classifier")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="steps of each stage")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    variants = {"per-stage": per_stage, "one group": one_group}
    results: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = str(root / "mnist")
        shard_dataset("mnist", data, ShardOptions(channels=1), progress=False)
        connect_ray("local")
        for repeat in range(args.repeats):
            order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
            for name in order:
                job = _job(root / f"{repeat}-{name.replace(' ', '-')}", data, args.steps, "job")
                client = MlflowClient(job.tracking_uri)
                experiment = ensure_experiment(client, "bench", None)
                run_id = client.create_run(experiment).info.run_id
                started = time.time()
                variants[name](job, run_id)
                wall = time.time() - started
                results[name].append((wall, _first_metrics(client, run_id, started)))
                print(f"{name}: {wall:.1f} s", flush=True)
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, {args.steps} steps a stage")
    print(
        "| way | wall (s), median (each repeat) | first metric of autoencoder / denoiser / "
        "classifier (s, median) |"
    )
    print("|---|---:|---|")
    for name, runs in results.items():
        walls = [wall for wall, _ in runs]
        firsts = {
            stage: statistics.median(first[stage] for _, first in runs)
            for stage in ("autoencoder", "denoiser", "classifier")
        }
        each = ", ".join(f"{w:.1f}" for w in walls)
        marks = " / ".join(f"{v:.1f}" for v in firsts.values())
        print(f"| {name} | {statistics.median(walls):.1f} ({each}) | {marks} |")
    saved = statistics.median(w for w, _ in results["per-stage"]) - statistics.median(
        w for w, _ in results["one group"]
    )
    print(f"\nsaved by one group: {saved:.1f} s a job (medians)")


if __name__ == "__main__":
    main()
