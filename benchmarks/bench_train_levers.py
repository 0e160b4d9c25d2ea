"""What each training lever buys on this machine: the `demo` preset's autoencoder and
denoiser steps in eager mode, with channels-last memory format, under
``torch.compile`` (inductor), under bf16 autocast, and combinations, at the preset's
batch size or several, measured side by side in one run.

    .venv/bin/python benchmarks/bench_train_levers.py [--steps 60] [--repeats 3]
        [--threads 2] [--levers eager channels_last compile ... bf16 bf16_channels_last]
        [--batch-sizes 32 64 128] [--stages denoiser autoencoder] [--profile STEPS]
        [--networks preset two_res_blocks no_attention]

Each variant builds its network and optimiser from the same seed and runs the stage's
real step (``training.losses``, AdamW with clipping from ``training.optimisation``, EMA
for the denoiser) on batches drawn once, in memory (reading is measured by
``bench_train.py``; here only the step counts). Every variant is timed ``--repeats``
times, the order of the variants rotating, after its warm-up (for ``compile``, the
warm-up includes the compilation, reported apart). Reports images/s (median and each
repeat) and the ratio to the first variant (the first lever at the first batch size).
``--networks`` also times the denoiser with its network (``UNetConfig``) changed as
``NETWORKS`` names.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from training.losses import autoencoder_losses, denoiser_losses
from training.models import EMA, Autoencoder, UNet
from training.optimisation import Optimisation, lr_factor, make_optimisation
from training.presets import get_preset

LEVERS = (
    "eager",
    "channels_last",
    "compile",
    "compile_channels_last",
    "bf16",
    "bf16_channels_last",
    "foreach_adamw",
)
# Changes to the demo denoiser's network
NETWORKS: dict[str, dict] = {
    "preset": {},
    "two_res_blocks": {"num_res_blocks": 2},
    "no_attention": {"attention": False},
}


def make_step(
    stage: str, config, lever: str, batch_size: int | None = None, network: str = "preset"
) -> tuple[Callable[[], None], int]:
    """One training step of ``stage`` with ``lever`` applied, at the preset's batch size
    or ``batch_size``, the denoiser's network changed as ``NETWORKS[network]``; returns
    the step and its batch size."""
    if stage == "denoiser" and NETWORKS[network]:
        config = config.model_copy(
            update={"denoiser": config.denoiser.model_copy(update=NETWORKS[network])}
        )
    if batch_size is not None:
        field = f"{stage}_training"
        training = getattr(config, field).model_copy(update={"batch_size": batch_size})
        config = config.model_copy(update={field: training})
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
    if lever == "foreach_adamw":  # the multi-tensor AdamW the trainers used before fused
        optimizer = torch.optim.AdamW(
            net.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, training))
        optimisation = Optimisation(optimizer, schedule, training.grad_clip)
    ema = EMA(net, training.ema_decay) if stage == "denoiser" else None
    forward = torch.compile(net) if lever.startswith("compile") else net
    diffusion = config.diffusion.build()

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=lever.startswith("bf16"))

    def step() -> None:
        net.train()
        with autocast:
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
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="measure every lever at each of these batch sizes (default: the preset's)",
    )
    parser.add_argument(
        "--networks",
        nargs="+",
        default=["preset"],
        choices=NETWORKS,
        help="time the denoiser with each of these networks",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="then profile this many steps of each variant: the operators by self time",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = get_preset("demo").for_data(32, 1, 10)
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads; demo preset; {args.steps} steps × {args.repeats} repeats"
    )
    for stage in args.stages:
        networks = args.networks if stage == "denoiser" else ["preset"]
        variants = [
            (lever, size, network)
            for size in (args.batch_sizes or [None])
            for network in networks
            for lever in args.levers
        ]
        steps, warmups, batches = {}, {}, {}
        rates = {variant: [] for variant in variants}
        for variant in variants:
            steps[variant], batches[variant] = make_step(stage, config, *variant)
            started = time.perf_counter()
            for _ in range(args.warmup):
                steps[variant]()
            warmups[variant] = time.perf_counter() - started
        for repeat in range(args.repeats):
            turn = repeat % len(variants)
            for variant in variants[turn:] + variants[:turn]:
                started = time.perf_counter()
                for _ in range(args.steps):
                    steps[variant]()
                rates[variant].append(
                    args.steps * batches[variant] / (time.perf_counter() - started)
                )
        first = variants[0]
        print(f"\n{stage}\n")
        print(
            f"| lever | network | batch | images/s, median (each repeat) | × {first[0]} "
            f"({first[2]}) at batch {batches[first]} | warm-up incl. compile (s) |"
        )
        print("|---|---|---:|---:|---:|---:|")
        reference = float(np.median(rates[first]))
        for variant in variants:
            median = float(np.median(rates[variant]))
            each = ", ".join(f"{r:.0f}" for r in rates[variant])
            print(
                f"| {variant[0]} | {variant[2]} | {batches[variant]} | {median:.0f} ({each}) | "
                f"{median / reference:.2f} | {warmups[variant]:.1f} |"
            )
        for variant in variants if args.profile else []:
            print(
                f"\n{stage}, {variant[0]} ({variant[2]}) at batch {batches[variant]}: "
                "ms per step by operator\n"
            )
            profile_step(steps[variant], args.profile)


def profile_step(step: Callable[[], None], steps: int, top: int = 12) -> None:
    """The operators that take the most self time over ``steps`` steps, per step, and the
    calls per step (torch.profiler on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1000 / steps
    print("| operator | ms per step | share | calls per step |\n|---|---:|---:|---:|")
    for event in events[:top]:
        ms = event.self_cpu_time_total / 1000 / steps
        print(f"| {event.key} | {ms:.1f} | {ms / total:.0%} | {event.count / steps:.0f} |")
    print(f"| all | {total:.1f} | 100% | |")


if __name__ == "__main__":
    main()
