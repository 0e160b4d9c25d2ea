"""What each training lever buys on this machine: the `demo` preset's autoencoder and
denoiser steps in eager mode, with channels-last memory format, under
``torch.compile`` (inductor) and both, measured side by side in one run.

    .venv/bin/python benchmarks/bench_train_levers.py [--steps 60] [--repeats 3]
        [--threads 2] [--levers eager channels_last compile compile_channels_last]

Each variant builds its network and optimiser from the same seed and runs the stage's
real step (``training.losses``, AdamW with clipping from ``training.optimisation``, EMA
for the denoiser) on batches drawn once, in memory (reading is measured by
``bench_train.py``; here only the step counts). Every variant is timed ``--repeats``
times, the order of the variants rotating, after its warm-up (for ``compile``, the
warm-up includes the compilation, reported apart). Reports images/s (median and each
repeat) and the ratio to eager.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from training.losses import autoencoder_losses, denoiser_losses
from training.models import EMA, Autoencoder, UNet
from training.optimisation import make_optimisation
from training.presets import get_preset

LEVERS = ("eager", "channels_last", "compile", "compile_channels_last")


def make_step(stage: str, config, lever: str) -> tuple[Callable[[], None], int]:
    """One training step of ``stage`` with ``lever`` applied; its batch size."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(1)
    memory = torch.channels_last if "channels_last" in lever else torch.contiguous_format
    if stage == "autoencoder":
        training = config.autoencoder_training
        net = Autoencoder(config.autoencoder)
        x = (
            torch.rand(
                (training.batch_size, config.image_channels, config.image_size, config.image_size),
                generator=generator,
            )
            .mul(2)
            .sub(1)
        )
        batch = (x.contiguous(memory_format=memory),)
    else:
        training = config.denoiser_training
        net = UNet(config.denoiser)
        z0 = torch.randn((training.batch_size, *config.latent_shape), generator=generator)
        y = torch.randint(0, config.num_classes, (training.batch_size,), generator=generator)
        batch = (z0.contiguous(memory_format=memory), y)
    net = net.to(memory_format=memory)
    optimisation = make_optimisation(net, training)
    ema = EMA(net, training.ema_decay) if stage == "denoiser" else None
    forward = torch.compile(net) if lever.startswith("compile") else net
    diffusion = config.diffusion.build()

    def step() -> None:
        net.train()
        if stage == "autoencoder":
            loss = autoencoder_losses(forward, batch[0], config.autoencoder.kl_weight)
        else:
            loss = denoiser_losses(
                forward, diffusion, batch[0], batch[1], config.diffusion, config.num_classes
            )
        optimisation.step(loss["loss"], net)
        if ema is not None:
            ema.update(net)

    return step, training.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stages", nargs="+", default=["denoiser", "autoencoder"])
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=LEVERS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = get_preset("demo").for_data(32, 1, 10)
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads; demo preset; {args.steps} steps × {args.repeats} repeats"
    )
    for stage in args.stages:
        steps, warmups, rates = {}, {}, {lever: [] for lever in args.levers}
        for lever in args.levers:
            steps[lever], batch = make_step(stage, config, lever)
            started = time.perf_counter()
            for _ in range(args.warmup):
                steps[lever]()
            warmups[lever] = time.perf_counter() - started
        for repeat in range(args.repeats):
            turn = repeat % len(args.levers)
            order = args.levers[turn:] + args.levers[:turn]
            for lever in order:
                started = time.perf_counter()
                for _ in range(args.steps):
                    steps[lever]()
                rates[lever].append(args.steps * batch / (time.perf_counter() - started))
        eager = np.median(rates["eager"]) if "eager" in rates else None
        print(f"\n{stage} (batch {batch})\n")
        print("| lever | images/s, median (each repeat) | × eager | warm-up incl. compile (s) |")
        print("|---|---:|---:|---:|")
        for lever in args.levers:
            median = float(np.median(rates[lever]))
            each = ", ".join(f"{r:.0f}" for r in rates[lever])
            ratio = f"{median / eager:.2f}" if eager else "–"
            print(f"| {lever} | {median:.0f} ({each}) | {ratio} | {warmups[lever]:.1f} |")


if __name__ == "__main__":
    main()
