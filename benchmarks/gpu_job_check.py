"""A real training job on one GPU: ``ldm shard`` and ``ldm train`` as a user runs them,
on the ``base`` preset with short step budgets, then what the job's MLflow run says.

    python3 benchmarks/gpu_job_check.py [--preset base] [--steps 600] [--images 4096]
                                        [--gpu | --no-gpu] [--json FILE] [--keep DIR]

It makes a seeded dataset of synthetic images (nothing is downloaded), shards it, and
trains every stage as Ray Train jobs on a local Ray with MLflow in a sqlite file and
checkpoints in a local folder, with the denoiser's step budget cut to ``--steps`` (the
other stages' to a fifth of it). Then it reads the run: what each stage ran on the
device (``STAGE/cuda_graph``, ``STAGE/bf16_autocast``: 1 in use), the images/s rank 0
logged (the median of the windows after the first, which holds the compiling), the loss
at the first and last logged step, the checkpoints logged to the run, and the version
registered. ``gpu_check.py``'s ``denoiser:graph_compile_cl`` run times the same step
without Ray, the loader or MLflow. Needs the project's requirements; on a GPU machine
``gpu_check.sh``'s ``job`` part unpacks them from the archive ``gpu_bundle.py`` packs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("autoencoder", "denoiser", "classifier")
SIZES = {"tiny": (32, 1), "demo": (32, 1), "base": (64, 3)}  # image side, channels
RUN = re.compile(r"MLflow run (?P<id>[0-9a-f]{32}) at (?P<uri>\S+)\)")


def synthetic_images(n: int, side: int, channels: int, classes: int, seed: int) -> dict:
    """``n`` seeded images: class ``c`` is a bright square at its own place on noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 64, (n, side, side, channels), dtype=np.uint8)
    cell = side // 4
    for c in range(classes):
        row, col = divmod(c % 16, 4)
        images[labels == c, row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = 230
    names = np.array([f"class-{c}" for c in range(classes)])
    return {
        "images": images.squeeze(-1) if channels == 1 else images,
        "labels": labels,
        "class_names": names,
    }


def budgets(preset: str, steps: int) -> dict[str, Any]:
    """The model config: the preset with the denoiser's budget ``steps`` and the other
    stages' a fifth of it, each logging and warming up in proportion."""

    def stage(n: int) -> dict[str, int]:
        return {"steps": n, "warmup_steps": n // 10, "log_every": max(n // 12, 1)}

    other = max(steps // 5, 10)
    return {
        "preset": preset,
        "autoencoder_training": stage(other),
        "denoiser_training": stage(steps),
        "classifier_training": stage(other),
    }


def ldm(args: list[str], env: dict[str, str], log: Path, timeout_s: float) -> str:
    """Run ``ldm ARGS`` with its output appended to ``log``; returns the log's text.
    Interrupted or out of time, it passes SIGINT on, as Ctrl-C would."""
    command = [sys.executable, "-m", "flows.cli", *args]
    print("$ ldm " + " ".join(args), flush=True)
    with log.open("a") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = process.wait(timeout=timeout_s)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            raise SystemExit(f"gpu_job_check: 'ldm {args[0]}' stopped; its log: {log}") from None
    text = log.read_text()
    if code:
        print(text[-4000:], file=sys.stderr)
        raise SystemExit(f"gpu_job_check: 'ldm {args[0]}' exited {code}; its log: {log}")
    return text


def read_run(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """What the MLflow run says of each stage (see the module's docstring)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)

    def history(key: str) -> list:
        return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)

    stages = {}
    for stage in STAGES:
        loss, speed = history(f"{stage}/loss"), history(f"{stage}/images_per_s")
        if not loss:
            continue
        steady = [m.value for m in speed[1:]] or [m.value for m in speed]
        applied = {k: history(f"{stage}/{k}") for k in ("cuda_graph", "bf16_autocast")}
        stages[stage] = {
            "last_logged_step": loss[-1].step,
            "loss_first": round(loss[0].value, 4),
            "loss_last": round(loss[-1].value, 4),
            "images_per_s": round(statistics.median(steady), 1) if steady else None,
            "logged_span_s": round((loss[-1].timestamp - loss[0].timestamp) / 1000, 1),
            **{k: bool(v[-1].value) if v else None for k, v in applied.items()},
        }
    artifacts = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    return {
        "stages": stages,
        "checkpoint_folders": artifacts,
        "registered": [f"{v.name}/{v.version}" for v in versions],
    }


def share_of_bare_step(result: dict[str, Any], bare_json: Path) -> float | None:
    """The job's denoiser images/s over that of ``gpu_check.py``'s run of the step the
    preset trains with (``graph_compile_cl`` at the preset's batch), when both exist."""
    bare = json.loads(bare_json.read_text())
    if bare.get("preset") != result["preset"]:
        return None
    steps = [r for r in bare.get("results", []) if r.get("run") == "denoiser:graph_compile_cl"]
    job = result["stages"].get("denoiser", {}).get("images_per_s")
    if not steps or "images_per_s" not in steps[0] or not job:
        return None
    return round(job / steps[0]["images_per_s"], 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=600, help="the denoiser's step budget")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cpus-per-worker", type=int, default=min(os.cpu_count() or 2, 8))
    parser.add_argument("--timeout-s", type=float, default=420)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument(
        "--bare",
        type=Path,
        help="gpu_check.py's JSON of the same machine: the job's denoiser images/s is "
        "also given as a share of its bare step's (the run the preset trains with)",
    )
    parser.add_argument("--keep", type=Path, help="the job's folder (default: a temporary one)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    home = args.keep or Path(tempfile.mkdtemp(prefix="ldm-job-check-"))
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"LDM_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    log = home / "job.log"

    side, channels = SIZES[args.preset]
    np.savez(home / "images.npz", **synthetic_images(args.images, side, channels, 10, seed=0))
    (home / "model.json").write_text(json.dumps(budgets(args.preset, args.steps)))
    data = home / "dataset"

    def left() -> float:
        return args.timeout_s - (time.monotonic() - started)

    ldm(
        [
            "shard",
            str(home / "images.npz"),
            str(data),
            "--image-size",
            str(side),
            "--channels",
            str(channels),
            "--shard-max-samples",
            "512",
            "--no-progress",
        ],
        env,
        log,
        left(),
    )
    trained = time.monotonic()
    output = ldm(
        [
            "train",
            "--config",
            str(home / "model.json"),
            "--run-name",
            "job-check",
            "--cpus-per-worker",
            str(args.cpus_per_worker),
            "--gpu" if args.gpu else "--no-gpu",
            str(data),
        ],
        env,
        log,
        left(),
    )
    train_s = time.monotonic() - trained
    match = RUN.search(output)
    if match is None:
        raise SystemExit(f"gpu_job_check: no MLflow run in the output of 'ldm train': {log}")
    result = {
        "preset": args.preset,
        "device": "cuda" if args.gpu else "cpu",
        "images": args.images,
        "train_wall_s": round(train_s, 1),
        "run_id": match["id"],
        **read_run(match["uri"], match["id"]),
    }
    if args.bare and args.bare.exists():
        result["denoiser_share_of_bare_step"] = share_of_bare_step(result, args.bare)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
