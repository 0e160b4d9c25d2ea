"""Fewer denoiser steps for the same quality? The `demo` denoiser trained under other
precisions, step budgets, learning-rate schedules, loss weightings and network sizes,
over seeds, scored by the project's evaluator.

    .venv/bin/python benchmarks/bench_schedule.py [--variants base bf16 ...]
        [--seeds 0,1,2] [--samples-per-class 50] [--autoencoder-steps N]
        [--state benchmarks/.bench_ip] [--out benchmarks/RESULTS.md]

Every variant starts from the same autoencoder and latent cache (``bench_ip.py``'s,
kept in ``--state``; another one with ``--autoencoder-steps``) and changes only the
denoiser's training config, under the key "diffusion" its diffusion config and under
"network" its network (``UNetConfig``): ``VARIANTS`` name what they change from
``BEFORE`` (the demo's schedule before this benchmark; the plain loss and the demo's
network unless changed).
Each trained denoiser is scored at the promotion defaults (DDIM 50, guidance 2) and
at DDIM 10, with fixed sampling seeds, ``--samples-per-class`` images per class.
Finished runs are kept in ``--state``/schedules.json, so an interrupted run
continues where it stopped. Only quality is compared here: the step time of each
precision is measured side by side by ``bench_train_levers.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_ip import ABLATION_SCHEDULE, prepare, train_denoiser
from benchmarks.report import publish
from training.evaluation.evaluator import get_evaluator
from training.evaluation.scoring import EvaluationSettings, evaluate_model
from training.latent_diffusion import LatentDiffusion

# The demo denoiser's schedule before this benchmark (the DDPM-IP ablation's); each
# variant changes some of it.
BEFORE = ABLATION_SCHEDULE
VARIANTS: dict[str, dict] = {
    "base": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "bf16_cos800": {"precision": "bf16", "steps": 800, "lr_decay": "cosine"},
    "bf16_cos800_lr2e-3": {
        "precision": "bf16",
        "steps": 800,
        "lr_decay": "cosine",
        "learning_rate": 2e-3,
    },
    "bf16_cos600_lr2e-3": {
        "precision": "bf16",
        "steps": 600,
        "lr_decay": "cosine",
        "learning_rate": 2e-3,
    },
    "bf16_cos1000": {"precision": "bf16", "steps": 1000, "lr_decay": "cosine"},
    "bf16_800_lr3e-3": {"precision": "bf16", "steps": 800, "learning_rate": 3e-3},
    "bf16_b64": {"precision": "bf16", "batch_size": 64},
    "bf16_b64_lr2e-3_cos": {
        "precision": "bf16",
        "batch_size": 64,
        "learning_rate": 2e-3,
        "lr_decay": "cosine",
    },
    "bf16_b48_lr2e-3_cos": {
        "precision": "bf16",
        "batch_size": 48,
        "learning_rate": 2e-3,
        "lr_decay": "cosine",
    },
    "bf16_b32_lr2e-3_cos": {
        "precision": "bf16",
        "batch_size": 32,
        "learning_rate": 2e-3,
        "lr_decay": "cosine",
    },
    "bf16_b64_1000_lr2e-3": {
        "precision": "bf16",
        "batch_size": 64,
        "steps": 1000,
        "learning_rate": 2e-3,
    },
}
# The demo preset's denoiser schedule from 2026-12-03 (1,500 steps × 64, lr 2e-3,
# cosine, bf16), with the Min-SNR loss weighting and fewer steps.
DEMO = VARIANTS["bf16_b64_lr2e-3_cos"]
VARIANTS |= {
    "demo": DEMO,
    "demo_1000": DEMO | {"steps": 1000},
    "demo_minsnr5": DEMO | {"diffusion": {"min_snr_gamma": 5.0}},
    "demo_1000_minsnr5": DEMO | {"steps": 1000, "diffusion": {"min_snr_gamma": 5.0}},
    "demo_1200_minsnr5": DEMO | {"steps": 1200, "diffusion": {"min_snr_gamma": 5.0}},
    "demo_1100_minsnr5": DEMO | {"steps": 1100, "diffusion": {"min_snr_gamma": 5.0}},
    "demo_1300_minsnr5": DEMO | {"steps": 1300, "diffusion": {"min_snr_gamma": 5.0}},
}
# The demo preset's denoiser from 2026-12-05 (the one above with 1,300 steps), with a
# smaller network: no self-attention, or one residual block a level.
PRESET = VARIANTS["demo_1300_minsnr5"]
VARIANTS |= {
    "preset_noattn": PRESET | {"network": {"attention": False}},
    "preset_nrb1": PRESET | {"network": {"num_res_blocks": 1}},
    "preset_nrb1_noattn": PRESET | {"network": {"num_res_blocks": 1, "attention": False}},
}
CELLS = (("ddim", 50), ("ddim", 10))
GUIDANCE = 2.0


def run_variant(
    base: LatentDiffusion,
    latents: torch.Tensor,
    labels: torch.Tensor,
    changes: dict,
    seed: int,
    data_url: str,
    evaluator,
    samples_per_class: int,
) -> dict:
    """Train one denoiser with ``changes`` and score it in every cell."""
    training = {k: v for k, v in changes.items() if k not in ("diffusion", "network")}
    model, seconds = train_denoiser(
        base,
        latents,
        labels,
        seed,
        0.0,
        BEFORE | training,
        changes.get("diffusion"),
        changes.get("network"),
    )
    training = model.config.denoiser_training
    result = {
        "train_s": seconds,
        "steps": training.steps,
        "batch_size": training.batch_size,
        "cells": {},
    }
    for sampler, n in CELLS:
        settings = EvaluationSettings(
            samples_per_class=samples_per_class,
            guidance_scale=GUIDANCE,
            sampler=sampler,
            steps=n,
            exposure_samples=0,
        )
        metrics = evaluate_model(model, data_url, evaluator, settings).metrics
        result["cells"][f"{sampler}{n}"] = {k: metrics[k] for k in ("class_consistency", "fd")}
    return result


def _name(variant: str, args) -> str:
    """A variant's name in the results: with the autoencoder's steps when not the demo's."""
    steps = args.autoencoder_steps
    return variant if steps is None else f"{variant}@ae{steps}"


def _batch(name: str) -> int:
    return (BEFORE | VARIANTS[name.split("@")[0]])["batch_size"]


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def table(done: dict, variants: list[str], seeds: list[int]) -> list[str]:
    keys = [f"{s}{n}" for s, n in CELLS]
    rows = [
        "| variant | steps × batch | "
        + " | ".join(f"{k}: class consistency | {k}: FD" for k in keys)
        + " |",
        "|---|---:|" + "---:|" * (2 * len(keys)),
    ]
    for name in variants:
        runs = [done[f"{name}/{seed}"] for seed in seeds if f"{name}/{seed}" in done]
        if not runs:
            continue
        cells = []
        for key in keys:
            cells.append(_mean_sd([r["cells"][key]["class_consistency"] for r in runs]))
            cells.append(_mean_sd([r["cells"][key]["fd"] for r in runs]))
        rows.append(
            f"| {name} ({len(runs)} seed{'s' * (len(runs) > 1)}) | "
            f"{runs[0]['steps']} × {_batch(name)} | " + " | ".join(cells) + " |"
        )
    return rows


def train_missing(args, seeds: list[int], done: dict, done_file: Path) -> None:
    """Train and score every variant and seed not in ``done`` yet, saving each."""
    data_url, base, latents, labels = prepare(args.state, args.autoencoder_steps)
    evaluator = get_evaluator(data_url, str(args.state / "evaluators"))
    for seed in seeds:  # every variant's first seed first: early answers
        for name in args.variants:
            key = f"{_name(name, args)}/{seed}"
            if key in done:
                continue
            done[key] = run_variant(
                base,
                latents,
                labels,
                VARIANTS[name],
                seed,
                data_url,
                evaluator,
                args.samples_per_class,
            )
            done_file.write_text(json.dumps(done, indent=1))
            print(key, json.dumps(done[key]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument(
        "--autoencoder-steps",
        type=int,
        default=None,
        help="train the shared autoencoder this many steps (default: the demo preset's)",
    )
    parser.add_argument("--state", type=Path, default=Path("benchmarks/.bench_ip"))
    parser.add_argument("--out", type=Path, default=None, help="append the table here")
    parser.add_argument(
        "--report-only", action="store_true", help="print the table of the finished runs"
    )
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    args.state.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    done_file = args.state / "schedules.json"
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    # "base" is BEFORE itself: bench_ip.py's γ = 0 runs trained it already
    # with the same autoencoder, seeds and evaluator; reuse them when they are there.
    ablation = args.state / "results.json"
    earlier = json.loads(ablation.read_text()) if ablation.exists() else {}
    for seed in seeds:
        if f"base/{seed}" not in done and f"0.0/{seed}/1500" in earlier:
            run = earlier[f"0.0/{seed}/1500"]
            cells = {f"{s}{n}": run["cells"][f"{s}{n}"] for s, n in CELLS}
            done[f"base/{seed}"] = {"train_s": run["train_s"], "steps": 1500, "cells": cells}
    if not args.report_only:
        train_missing(args, seeds, done, done_file)
    lines = [
        f"## Denoiser schedules ({time.strftime('%Y-%m-%d')}, `benchmarks/bench_schedule.py`)",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}. "
        f"Command: `{' '.join(['benchmarks/bench_schedule.py', *sys.argv[1:]])}`. Demo "
        f"preset (γ = 0), one autoencoder, `BEFORE` the schedule each variant changes; "
        f"cells are mean ± sd over seeds, "
        f"{10 * args.samples_per_class} samples each, w = {GUIDANCE:g}.",
        "",
        *table(done, [_name(v, args) for v in args.variants], seeds),
    ]
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
