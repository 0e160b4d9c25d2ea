"""Epsilon scaling on a registered model: class consistency and FD over a grid of b.

    .venv/bin/python benchmarks/bench_eps_scaling.py [--model-uri models:/ldm@champion]
        [--tracking-uri sqlite:///…/outputs/mlflow.db] [--data outputs/data/mnist]
        [--scales 0.98,0.99,0.995,1,1.005,1.01] [--cells ddim10,ddim20]
        [--samples-per-class 50] [--out benchmarks/RESULTS.md]

Each cell samples the same seeds (the evaluator's fixed ones) with ε̂ divided by a
constant λ = b (Ning et al. 2024 schedule with k = 0), guidance w = 2, and measures
them with the project's evaluator on the val split. Nothing is logged to MLflow: the
version's own evaluation tags stay as they are.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import publish
from training.evaluation.evaluator import get_evaluator
from training.evaluation.scoring import EvaluationSettings, evaluate_model
from training.mlflow.registry import load_model_version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-uri", default="models:/ldm@champion")
    default_uri = f"sqlite:///{Path('outputs/mlflow.db').resolve()}"
    parser.add_argument("--tracking-uri", default=default_uri)
    parser.add_argument("--data", default="outputs/data/mnist")
    parser.add_argument("--evaluators", default="outputs/evaluators")
    parser.add_argument("--scales", default="0.98,0.99,0.995,1,1.005,1.01")
    parser.add_argument("--cells", default="ddim10,ddim20")
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="append the table here")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    scales = [float(b) for b in args.scales.split(",")]
    cells = []
    for cell in args.cells.split(","):  # ddim10, ddpm100, dpmpp_2m20
        match = re.fullmatch(r"([a-z_0-9]*?[a-z_])(\d+)", cell)
        if match is None:
            parser.error(f"--cells: {cell!r} is not SAMPLER+STEPS, e.g. ddim10")
        cells.append((match[1], int(match[2])))
    model = load_model_version(args.model_uri, args.tracking_uri)
    evaluator = get_evaluator(args.data, args.evaluators)
    rows = []
    for b in scales:
        row = []
        for sampler, steps in cells:
            settings = EvaluationSettings(
                samples_per_class=args.samples_per_class,
                sampler=sampler,
                steps=steps,
                eps_scaling=b,
                exposure_samples=0,
            )
            metrics = evaluate_model(model, args.data, evaluator, settings).metrics
            row.append((metrics["class_consistency"], metrics["fd"]))
            print(f"b={b:g} {sampler}{steps}: cc {row[-1][0]:.3f}, FD {row[-1][1]:.3f}", flush=True)
        rows.append((b, row))
    n = 10 * args.samples_per_class
    lines = [
        f"## Epsilon scaling on {args.model_uri} ({time.strftime('%Y-%m-%d')}, "
        "`benchmarks/bench_eps_scaling.py`)",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs. Command: "
        f"`{' '.join(['benchmarks/bench_eps_scaling.py', *sys.argv[1:]])}`. Cells are "
        f"class consistency / FD over {n} samples (the same seeds in every row), w = 2; "
        f"standard error of a class consistency near 0.9: {math.sqrt(0.09 / n):.3f}.",
        "",
        "| b (λ = b) | " + " | ".join(f"{s.upper()} {n}" for s, n in cells) + " |",
        "|---|" + "---:|" * len(cells),
    ]
    for b, row in rows:
        lines.append(f"| {b:g} | " + " | ".join(f"{cc:.3f} / {fd:.3f}" for cc, fd in row) + " |")
    text = "\n".join(lines) + "\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
