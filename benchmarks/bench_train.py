"""Denoiser-stage throughput through the Ray Train loop (1 worker) next to a bare
single-process PyTorch loop with the same model, batch, data and threads.

    .venv/bin/python benchmarks/bench_train.py [--steps 200] [--warmup 50] [--threads 2]

Both read the same cached latents (the built-in MNIST encoded by an autoencoder)
through ``data.build_loader`` and run the same step (``training.losses``): DDPM-IP
loss, AdamW, gradient clipping, EMA. The Ray number is the mean of the images/s the
loop logs to MLflow after its warm-up interval. Target: Ray / bare >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
import torch
from mlflow import MlflowClient

from data.manifest import ShardOptions
from data.reader import build_loader
from data.shard import shard_dataset
from training.checkpoints import StageState, save_checkpoint
from training.job import ScalingSettings, TrainJobConfig
from training.losses import denoiser_losses
from training.mlflow.tracking import ensure_experiment, resolve_tracking_uri
from training.models import EMA, Autoencoder, UNet
from training.optimisation import make_optimisation
from training.presets import get_preset
from training.ray.driver import fit_stage
from training.ray.latent_cache import cache_latents


def _latents(root: Path, config) -> str:
    data = str(root / "mnist")
    shard_dataset("mnist", data, ShardOptions(channels=1, shard_max_samples=1000), progress=False)
    torch.manual_seed(0)
    state = StageState("autoencoder", 0, 0, 0, Autoencoder(config.autoencoder).state_dict(), {}, {})
    save_checkpoint(root / "autoencoder", state, config)
    return cache_latents(data, str(root / "autoencoder"), str(root / "latents"), config)


def bare_loop(latents: str, config, steps: int, warmup: int, threads: int) -> float:
    """images/s of the same step in this process, timed after ``warmup`` steps."""
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    training, diffusion = config.denoiser_training, config.diffusion.build()
    unet = UNet(config.denoiser)
    optimisation = make_optimisation(unet, training)
    ema = EMA(unet, training.ema_decay)
    done, epoch, started = 0, 0, None
    while done < warmup + steps:
        loader = build_loader(
            latents, "train", 0, 1, training.batch_size, config.seed, epoch, num_workers=1
        )
        for z0, y in loader:
            if done == warmup:
                started = time.perf_counter()
            unet.train()
            loss = denoiser_losses(unet, diffusion, z0, y, config.diffusion, config.num_classes)
            optimisation.step(loss["loss"], unet)
            ema.update(unet)
            done += 1
            if done == warmup + steps:
                break
        epoch += 1
    return steps * training.batch_size / (time.perf_counter() - started)


def ray_loop(latents: str, config, root: Path, steps: int, warmup: int, threads: int) -> float:
    tracking = resolve_tracking_uri(root / "store")
    client = MlflowClient(tracking)
    experiment = ensure_experiment(client, "bench", f"file://{root}/artifacts")
    run_id = client.create_run(experiment).info.run_id
    training = config.denoiser_training.model_copy(
        update={"steps": warmup + steps, "log_every": warmup}
    )
    job = TrainJobConfig(
        data_url=latents,
        model=config.model_copy(update={"denoiser_training": training}),
        scaling=ScalingSettings(num_workers=1, cpus_per_worker=threads, torch_threads=threads),
        storage_url=str(root / "runs"),
        run_name="bench",
        tracking_uri=tracking,
        checkpoint_every=warmup + steps,
        loader_workers=1,
    )
    fit_stage(job, "denoiser", latents, run_id)
    history = client.get_metric_history(run_id, "denoiser/images_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][1:]  # skip warm-up
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (the Ray loop logs every warm-up)")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    config = get_preset("demo").for_data(32, 1, 10)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ray.init(num_cpus=args.threads, include_dashboard=False)
        latents = _latents(root, config)
        bare = bare_loop(latents, config, args.steps, args.warmup, args.threads)
        through_ray = ray_loop(latents, config, root, args.steps, args.warmup, args.threads)
        ray.shutdown()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(
        f"denoiser (demo preset, batch {config.denoiser_training.batch_size}, "
        f"{args.threads} threads), {args.steps} steps after {args.warmup} warm-up:"
    )
    print(f"  bare PyTorch loop : {bare:8.1f} images/s")
    print(f"  Ray Train, 1 worker: {through_ray:8.1f} images/s  (ratio {through_ray / bare:.2f})")


if __name__ == "__main__":
    main()
