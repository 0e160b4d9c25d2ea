"""Denoiser-stage throughput through the Ray Train loop (1 worker) next to a bare
single-process PyTorch loop with the same model, batch, data and threads, on the
built-in digits (4,500 training images) and on a small dataset of their first
``--small`` images (1,620 training images by default: 12 batches an epoch).

    .venv/bin/python benchmarks/bench_train.py [--steps 200] [--warmup 50] [--threads 2]
        [--small 1800]

Both read the same cached latents (encoded by one autoencoder) through
``data.build_loader`` and run the same step (``training.losses``): DDPM-IP loss, in the
preset's precision, AdamW, gradient clipping, EMA. Each loop reads the shards every
epoch (``memory_budget`` 0, one loader worker) and from memory (the split decoded once,
256 MiB budget, the default of ``TrainJobConfig.loader_memory_mb``). The Ray number is
the mean of the images/s the loop logs to MLflow after its warm-up interval. Targets:
Ray / bare >= 0.9, and the small dataset as fast as the large one.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import ray
import torch
from mlflow import MlflowClient

from data.manifest import ShardOptions, load_manifest
from data.mnist import load_mnist
from data.reader import build_loader
from data.shard import shard_dataset
from training.checkpoints import StageState, save_checkpoint
from training.job import ScalingSettings, TrainJobConfig
from training.losses import denoiser_losses
from training.mlflow.tracking import ensure_experiment, resolve_tracking_uri
from training.models import EMA, Autoencoder, UNet
from training.optimisation import autocast, make_optimisation
from training.presets import get_preset
from training.ray.driver import fit_stage
from training.ray.latent_cache import cache_latents


def _latents(root: Path, config, source: str, name: str) -> str:
    data = str(root / name)
    shard_dataset(source, data, ShardOptions(channels=1, shard_max_samples=1000), progress=False)
    autoencoder = root / "autoencoder"
    if not autoencoder.exists():
        torch.manual_seed(0)
        net = Autoencoder(config.autoencoder)
        optimisation = make_optimisation(net, config.autoencoder_training)
        state = StageState(
            "autoencoder",
            0,
            0,
            0,
            net.state_dict(),
            optimisation.optimizer.state_dict(),
            optimisation.scheduler.state_dict(),
        )
        save_checkpoint(autoencoder, state, config)
    return cache_latents(data, str(autoencoder), str(root / f"{name}-latents"), config)


def _small_source(root: Path, count: int) -> str:
    images, labels = load_mnist(32)
    path = root / "small.npz"
    np.savez(path, images=images[:count], labels=labels[:count])
    return str(path)


def bare_loop(latents: str, config, steps: int, warmup: int, threads: int, memory_mb: int) -> float:
    """images/s of the same step in this process, timed after ``warmup`` steps: a loader
    per epoch, streaming the shards (``memory_mb`` 0) or serving the split from memory."""
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    training, diffusion = config.denoiser_training, config.diffusion.build()
    unet = UNet(config.denoiser)
    optimisation = make_optimisation(unet, training)
    ema = EMA(unet, training.ema_decay)
    loaders = (
        build_loader(
            latents,
            "train",
            0,
            1,
            training.batch_size,
            config.seed,
            epoch,
            num_workers=1,
            memory_budget=memory_mb << 20,
        )
        for epoch in itertools.count()
    )
    started = None
    batches = itertools.chain.from_iterable(loaders)
    for done, (z0, y) in enumerate(itertools.islice(batches, warmup + steps)):
        if done == warmup:
            started = time.perf_counter()
        unet.train()
        with autocast(training, "cpu"):  # the stage's precision, as the trainers run it
            loss = denoiser_losses(unet, diffusion, z0, y, config.diffusion, config.num_classes)
        optimisation.step(loss["loss"], unet)
        ema.update(unet)
    return steps * training.batch_size / (time.perf_counter() - started)


def ray_loop(
    latents: str, config, root: Path, steps: int, warmup: int, threads: int, memory_mb: int
) -> float:
    root.mkdir(parents=True, exist_ok=True)
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
        loader_memory_mb=memory_mb,
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
    parser.add_argument("--small", type=int, default=1800, help="images of the small dataset")
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (the Ray loop logs every warm-up)")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    config = get_preset("demo").for_data(32, 1, 10)
    timing = (args.steps, args.warmup, args.threads)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ray.init(num_cpus=args.threads, include_dashboard=False)
        for name, source in (("mnist", "mnist"), ("small", _small_source(root, args.small))):
            latents = _latents(root, config, source, name)
            images = load_manifest(latents).counts["train"]
            rows[f"{name} ({images} train images)"] = (
                bare_loop(latents, config, *timing, memory_mb=0),
                bare_loop(latents, config, *timing, memory_mb=256),
                ray_loop(latents, config, root / f"{name}-ray-0", *timing, memory_mb=0),
                ray_loop(latents, config, root / f"{name}-ray", *timing, memory_mb=256),
            )
        ray.shutdown()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(
        f"denoiser (demo preset, batch {config.denoiser_training.batch_size}, "
        f"{args.threads} threads), {args.steps} steps after {args.warmup} warm-up, images/s:"
    )
    print("| dataset | bare, streamed | bare, in memory | Ray, streamed | Ray, in memory |")
    print("|---|---|---|---|---|")
    for name, rates in rows.items():
        print(f"| {name} | " + " | ".join(f"{rate:.1f}" for rate in rates) + " |")
    for name, (bare, bare_kept, ray_streamed, ray_kept) in rows.items():
        print(
            f"{name}: in memory / streamed {bare_kept / bare:.2f} (bare), "
            f"{ray_kept / ray_streamed:.2f} (Ray); Ray / bare {ray_kept / bare_kept:.2f}"
        )


if __name__ == "__main__":
    main()
