"""A weekly retrain that warm-starts from last week's champion, against one from scratch.

Last week: the ``demo`` preset trained from scratch on 3,000 of the built-in digits'
training images; its version becomes ``@champion``. This week the dataset has grown to
all 4,500: a cold run trains it from scratch with the preset's budgets, a warm run
starts from the champion (``init_from``, the autoencoder reused) with a quarter of the
denoiser's and the classifier's steps. Both are measured by the project's evaluator on
this week's val split, side by side in one process on one machine.

    python benchmarks/bench_warm_start.py [--out DIR] [--fraction 0.25]

Takes about 25 minutes on 2 cores (two full demo trainings).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from data.manifest import ShardOptions
from data.shard import shard_dataset
from training.evaluation.evaluator import get_evaluator, iter_split
from training.evaluation.scoring import EvaluationSettings, evaluate_model
from training.job import ScalingSettings, TrainSettings
from training.mlflow.registry import load_model_version
from training.presets import get_preset
from training.ray.driver import run_training

LAST_WEEK_IMAGES = 3000


def _last_week(full_url: str, path: Path) -> Path:
    """The first images of this week's training split, as an .npz source."""
    images, labels = [], []
    for x, y in iter_split(full_url, "train"):
        images.append(((x[:, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy())
        labels.append(y.numpy())
    np.savez(
        path,
        images=np.concatenate(images)[:LAST_WEEK_IMAGES],
        labels=np.concatenate(labels)[:LAST_WEEK_IMAGES],
    )
    return path


def _shorter(fraction: float):
    demo = get_preset("demo")
    update = {}
    for name in ("denoiser_training", "classifier_training"):
        stage = getattr(demo, name)
        update[name] = stage.model_copy(
            update={
                "steps": max(1, round(stage.steps * fraction)),
                "warmup_steps": round(stage.warmup_steps * fraction),
            }
        )
    return demo.model_copy(update=update)


def _train(settings: TrainSettings, data_url: str) -> tuple[str, float]:
    started = time.perf_counter()
    result = run_training(settings.job(data_url))
    return str(result.model_version.version), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/bench-warm-start")
    parser.add_argument("--fraction", type=float, default=0.25)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{out}/mlflow.db"
    base = TrainSettings(
        scaling=ScalingSettings(cpus_per_worker=2.0),
        storage_url=str(out / "runs"),
        tracking_uri=tracking_uri,
        model_name="bench-warm",
    )
    full_url = str(out / "data" / "mnist")
    options = ShardOptions(channels=1)
    shard_dataset("mnist", full_url, options, progress=False)
    last_url = str(out / "data" / "last-week")
    shard_dataset(
        str(_last_week(full_url, out / "last-week.npz")), last_url, options, progress=False
    )

    champion, last_s = _train(base, last_url)
    MlflowClient(tracking_uri).set_registered_model_alias("bench-warm", "champion", champion)
    cold, cold_s = _train(base, full_url)
    warm_settings = base.model_copy(
        update={
            "model": _shorter(args.fraction),
            "init_from": "models:/bench-warm@champion",
            "reuse_autoencoder": True,
        }
    )
    warm, warm_s = _train(warm_settings, full_url)

    evaluator = get_evaluator(full_url, str(out / "evaluators"))
    settings = EvaluationSettings()
    rows = {}
    for label, version, seconds in (
        ("last week, from scratch (3,000 images)", champion, last_s),
        ("this week, from scratch", cold, cold_s),
        (f"this week, warm start ({args.fraction:g} of the steps)", warm, warm_s),
    ):
        model = load_model_version(f"models:/bench-warm/{version}", tracking_uri)
        metrics = evaluate_model(model, full_url, evaluator, settings).metrics
        rows[label] = {"version": version, "train_s": round(seconds, 1), **metrics}
    print(json.dumps(rows, indent=2))
    print("\n| run | train s | class consistency | FD | PSNR |\n|---|---|---|---|---|")
    for label, row in rows.items():
        print(
            f"| {label} | {row['train_s']:.0f} | {row['class_consistency']:.3f} | "
            f"{row['fd']:.3f} | {row['psnr']:.2f} |"
        )


if __name__ == "__main__":
    main()
