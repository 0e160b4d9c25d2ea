"""Image quality per network evaluation: DDIM at 10/20/50 steps against DPM-Solver++(2M)
at 10/15/20, on a registered model, with the project's evaluator.

    .venv/bin/python benchmarks/bench_solvers.py [--model-uri models:/ldm@champion]

Uses the model ``make run`` (``ldm retrain``) registers under LDM_HOME (or
``--tracking-uri``), the dataset it trained on and its cached evaluator. Every setting
samples the same labels with the same seed (``--samples-per-class`` per class,
classifier-free guidance ``--guidance-scale``) and is scored by
:func:`training.evaluation.scoring.evaluate_model`: class consistency, Fréchet distance
in the evaluator's feature space against the val split. With ``--autocast off bf16``
each setting is scored twice, the second time with the networks' forward under bf16
autocast as a serving replica with ``autocast: bf16`` runs it (the guidance's
arithmetic, the samplers' updates and the decoder in float32). Prints a
markdown table; logs nothing to MLflow.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from mlflow import MlflowClient

from training.evaluation.evaluator import get_evaluator
from training.evaluation.promotion import _training_data
from training.evaluation.scoring import EvaluationSettings, evaluate_model
from training.job import default_local_store
from training.latent_diffusion import LatentDiffusion
from training.mlflow.registry import load_model_version, resolve_model_version
from training.mlflow.tracking import resolve_tracking_uri

SETTINGS = [("ddim", 10), ("ddim", 20), ("ddim", 50), ("dpmpp_2m", 10), ("dpmpp_2m", 15)]
SETTINGS += [("dpmpp_2m", 20)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", default="models:/ldm@champion")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--autocast", nargs="+", default=["off"], choices=("off", "bf16"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = default_local_store()
    tracking_uri = resolve_tracking_uri(store, args.tracking_uri)
    name, version = resolve_model_version(args.model_uri, tracking_uri)
    data_url = _training_data(MlflowClient(tracking_uri), name, version)
    evaluator = get_evaluator(data_url, str(store / "evaluators"))
    model = load_model_version(f"models:/{name}/{version}", tracking_uri)
    passes = 2 if args.guidance_scale > 0 else 1
    rows = []
    for (sampler, steps), cast in itertools.product(SETTINGS, args.autocast):
        run_networks_under(model, cast)
        settings = EvaluationSettings(
            samples_per_class=args.samples_per_class,
            guidance_scale=args.guidance_scale,
            sampler=sampler,
            steps=steps,
            seed=args.seed,
        )
        started = time.perf_counter()
        metrics = evaluate_model(model, data_url, evaluator, settings).metrics
        rows.append((sampler, steps, cast, steps * passes, metrics, time.perf_counter() - started))
        print(rows[-1], flush=True)
    print(
        f"\n{name} v{version} on {data_url}; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {args.threads} threads; {args.samples_per_class} "
        f"samples per class, w = {args.guidance_scale:g}, seed {args.seed}\n"
    )
    print(
        "| sampler | steps | autocast | network evaluations per image | class consistency "
        "| FD | s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for sampler, steps, cast, evaluations, m, seconds in rows:
        print(
            f"| {sampler} | {steps} | {cast} | {evaluations} | {m['class_consistency']:.3f} | "
            f"{m['fd']:.3f} | {seconds:.0f} |"
        )


def run_networks_under(model: LatentDiffusion, cast: str) -> None:
    """The denoiser's and the classifier's forward under bf16 autocast for "bf16" (as a
    replica runs them: the classifier's gradient too), in float32 for "off"."""
    for net in (model.denoiser, model.classifier):
        forward = type(net).forward.__get__(net)

        def autocast_forward(*args: Any, _forward: Callable = forward, **kwargs: Any) -> Any:
            with torch.autocast("cpu", torch.bfloat16, enabled=cast == "bf16"):
                return _forward(*args, **kwargs)

        net.forward = autocast_forward


if __name__ == "__main__":
    main()
