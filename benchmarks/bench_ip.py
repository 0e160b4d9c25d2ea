"""The DDPM-IP ablation: does input perturbation (γ) pay at the step counts we serve?

    .venv/bin/python benchmarks/bench_ip.py [--gammas 0,0.1,0.15] [--seeds 0,1,2]
        [--denoiser-steps 1500] [--long-steps 6000] [--samples-per-class 50]
        [--state benchmarks/.bench_ip] [--out benchmarks/RESULTS.md]

One autoencoder (the demo preset's, seed 0) and one latent cache of the built-in
digits' train split; a demo-sized denoiser trained for each γ and seed with equal
steps (``--long-steps``: one more per γ, seed 0, for the budget question); each
evaluated with the project's evaluator (class consistency, Fréchet distance to the
val split, exposure bias) with fixed seeds at DDIM 10/20/50 and DDPM 100, guidance
w = 2, and with epsilon scaling (λ = 1.01) at DDIM 10 and 20 for γ = 0 and 0.1.
Beside them: the real-vs-real FD floor (500 train images against the val split) and
the binomial standard error of a class consistency over the samples of one cell.

Every finished model's numbers are kept in ``--state`` (with the autoencoder and the
cached latents), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import publish
from data.manifest import ShardOptions
from data.shard import shard_dataset
from training.evaluation.evaluator import get_evaluator, iter_split
from training.evaluation.metrics import frechet_distance
from training.evaluation.scoring import EvaluationSettings, evaluate_model
from training.latent_diffusion import LatentDiffusion
from training.local import train_stage
from training.presets import get_preset

CELLS = (("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddpm", 100))
# The demo denoiser's schedule this ablation was measured with (the preset's until
# bench_schedule.py moved it to bf16, batch 64 and a cosine decay).
ABLATION_SCHEDULE = {
    "steps": 1500,
    "batch_size": 128,
    "learning_rate": 1e-3,
    "warmup_steps": 100,
    "ema_decay": 0.995,
    "lr_decay": "constant",
    "precision": "fp32",
}
# The demo denoiser's network when the ablation ran (two residual blocks a level,
# self-attention at the lowest one)
ABLATION_NETWORK = {"num_res_blocks": 2, "attention": True}
SCALED_CELLS = (("ddim", 10), ("ddim", 20))
EPS_SCALING = 1.01
GUIDANCE = 2.0


def prepare(
    state: Path, autoencoder_steps: int | None = None
) -> tuple[str, LatentDiffusion, torch.Tensor, torch.Tensor]:
    """The dataset (sharded once), the trained autoencoder and the train latents; with
    ``autoencoder_steps``, an autoencoder trained that many steps (kept apart)."""
    data_url = str(state / "mnist")
    if not (state / "mnist" / "manifest.json").exists():
        shard_dataset("mnist", data_url, ShardOptions(channels=1), progress=False)
    config = get_preset("demo").for_data(32, 1, 10)
    suffix = ""
    if autoencoder_steps is not None:
        training = config.autoencoder_training.model_copy(update={"steps": autoencoder_steps})
        config = config.model_copy(update={"autoencoder_training": training})
        suffix = f"-{autoencoder_steps}"
    pixels, labels = map(torch.cat, zip(*iter_split(data_url, "train"), strict=True))
    folder = state / f"autoencoder{suffix}"
    if (folder / "config.json").exists():
        model = LatentDiffusion.load(folder)
    else:
        torch.manual_seed(0)
        model = train_stage("autoencoder", LatentDiffusion.build(config), pixels, labels, 0)
        model.save(folder)
    latents_file = state / f"latents{suffix}.pt"
    if latents_file.exists():
        latents = torch.load(latents_file)
    else:
        with torch.no_grad():
            latents = torch.cat([model.autoencoder.encode_latents(c) for c in pixels.split(256)])
        torch.save(latents, latents_file)
    return data_url, model, latents, labels


def train_denoiser(
    base: LatentDiffusion,
    latents: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    gamma: float,
    training_changes: dict,
    diffusion_changes: dict | None = None,
    network_changes: dict | None = None,
) -> tuple[LatentDiffusion, float]:
    """A denoiser on ``base``'s autoencoder and latents, with DDPM-IP ``gamma``, the
    demo's denoiser training config changed by ``training_changes``, its diffusion
    config by ``diffusion_changes`` and its network (``UNetConfig``) by
    ``network_changes``; returns the model and its training seconds."""
    config = base.config
    # The ablation's loss (no Min-SNR weighting) and network, unless changed
    plain = {"min_snr_gamma": 0.0}
    diffusion = config.diffusion.model_copy(
        update={**plain, **(diffusion_changes or {}), "input_perturbation": gamma}
    )
    training = config.denoiser_training.model_copy(update=training_changes)
    network = config.denoiser.model_copy(update={**ABLATION_NETWORK, **(network_changes or {})})
    config = config.model_copy(
        update={
            "diffusion": diffusion,
            "denoiser_training": training,
            "denoiser": network,
            "seed": seed,
        }
    )
    torch.manual_seed(seed)
    model = LatentDiffusion.build(config)
    model.autoencoder.load_state_dict(base.autoencoder.state_dict())
    started = time.perf_counter()
    model = train_stage("denoiser", model, latents, labels, seed)
    return model, time.perf_counter() - started


def denoiser_cells(
    base: LatentDiffusion,
    latents: torch.Tensor,
    labels: torch.Tensor,
    gamma: float,
    seed: int,
    steps: int,
    data_url: str,
    evaluator,
    samples_per_class: int,
) -> dict:
    """Train one denoiser and evaluate it in every cell."""
    schedule = ABLATION_SCHEDULE | {"steps": steps}
    model, seconds = train_denoiser(base, latents, labels, seed, gamma, schedule)
    results = {"train_s": seconds, "cells": {}}
    scaled = SCALED_CELLS if gamma in (0.0, 0.1) else ()
    for (sampler, n), b in [(c, 1.0) for c in CELLS] + [(c, EPS_SCALING) for c in scaled]:
        settings = EvaluationSettings(
            samples_per_class=samples_per_class,
            guidance_scale=GUIDANCE,
            sampler=sampler,
            steps=n,
            eps_scaling=b,
            exposure_samples=100 if (sampler, n, b) == ("ddim", 20, 1.0) else 0,
        )
        metrics = evaluate_model(model, data_url, evaluator, settings).metrics
        key = f"{sampler}{n}" + ("" if b == 1.0 else f"-eps{b:g}")
        keep = ("class_consistency", "fd", "exposure_bias")
        results["cells"][key] = {k: metrics[k] for k in keep if k in metrics}
        print(f"  γ={gamma} seed={seed} {key}: {results['cells'][key]}", flush=True)
    return results


def fd_floor(data_url: str, evaluator) -> float:
    """FD between 500 train images and the val split, in the evaluator's features."""
    train, _ = next(iter_split(data_url, "train", batch_size=500))
    val = torch.cat([x for x, _ in iter_split(data_url, "val")])
    return frechet_distance(evaluator.predict(train)[1].numpy(), evaluator.predict(val)[1].numpy())


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def table(done: dict, gammas: list[float], seeds: list[int], steps: int) -> list[str]:
    keys = [f"{s}{n}" for s, n in CELLS] + [f"{s}{n}-eps{EPS_SCALING:g}" for s, n in SCALED_CELLS]
    rows = [
        "| γ | " + " | ".join(keys) + " | exposure bias (DDIM 20) |",
        "|---|" + "---:|" * (len(keys) + 1),
    ]
    for gamma in gammas:
        runs = [done.get(f"{gamma}/{seed}/{steps}") for seed in seeds]
        runs = [r for r in runs if r is not None]
        if not runs:
            continue
        cells = []
        for key in keys:
            cc = [r["cells"][key]["class_consistency"] for r in runs if key in r["cells"]]
            fd = [r["cells"][key]["fd"] for r in runs if key in r["cells"]]
            cells.append(f"{_mean_sd(cc)} / {_mean_sd(fd)}" if cc else "—")
        bias = [r["cells"]["ddim20"]["exposure_bias"] for r in runs]
        rows.append(
            f"| {gamma:g} ({len(runs)} seeds) | " + " | ".join(cells) + f" | {_mean_sd(bias)} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gammas", default="0,0.1,0.15")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--denoiser-steps", type=int, default=1500, help="the demo preset's")
    parser.add_argument("--long-steps", type=int, default=0, help="one longer run per γ (0: none)")
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--state", type=Path, default=Path("benchmarks/.bench_ip"))
    parser.add_argument("--out", type=Path, default=None, help="append the tables here")
    args = parser.parse_args()
    gammas = [float(g) for g in args.gammas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    args.state.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    data_url, base, latents, labels = prepare(args.state)
    evaluator = get_evaluator(data_url, str(args.state / "evaluators"))
    done_file = args.state / "results.json"
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    plan = [(g, s, args.denoiser_steps) for g in gammas for s in seeds]
    plan += [(g, 0, args.long_steps) for g in gammas] if args.long_steps else []
    for gamma, seed, steps in plan:
        key = f"{gamma}/{seed}/{steps}"
        if key not in done:
            done[key] = denoiser_cells(
                base,
                latents,
                labels,
                gamma,
                seed,
                steps,
                data_url,
                evaluator,
                args.samples_per_class,
            )
            done_file.write_text(json.dumps(done, indent=1))
    n = 10 * args.samples_per_class
    lines = [
        f"## DDPM-IP ablation ({time.strftime('%Y-%m-%d')}, `benchmarks/bench_ip.py`)",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs. Command: "
        f"`{' '.join(['benchmarks/bench_ip.py', *sys.argv[1:]])}`. Demo preset, one "
        f"autoencoder, denoisers of {args.denoiser_steps} steps; cells are class "
        f"consistency / FD (mean ± sd over seeds), {n} samples each, w = {GUIDANCE:g}.",
        f"Real-vs-real FD floor: {fd_floor(data_url, evaluator):.3f}. Standard error of a "
        f"class consistency near 0.9 over {n} samples: "
        f"{math.sqrt(0.9 * 0.1 / n):.3f}.",
        "",
        *table(done, gammas, seeds, args.denoiser_steps),
    ]
    if args.long_steps:
        lines += ["", f"Longer runs ({args.long_steps} steps, seed 0):", ""]
        lines += table(done, gammas, [0], args.long_steps)
    text = "\n".join(lines) + "\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
