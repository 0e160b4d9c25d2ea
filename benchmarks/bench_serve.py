"""Sampling throughput and latency of the Serve app: step-level batching against
request-level batching and unbatched serving, on a uniform and a mixed workload.

    .venv/bin/python benchmarks/bench_serve.py [--preset demo] [--threads 1]

Registers an untrained model of ``--preset`` in a temporary sqlite MLflow, starts a
local Ray (``--cpus``) and Serve on 127.0.0.1, and deploys the app three times, one
after the other, in the same run:

- ``step``: step-level batching (``max_rows_per_forward`` 64): requests join at every
  denoising step and share forwards whatever their settings;
- ``request``: the same loop with ``join_running`` false, so a batch runs to its
  longest chain before waiting requests start (request-level batching, like the
  ``@serve.batch`` grouping it replaced, except that it also mixes settings);
- ``unbatched``: one image per forward (``max_rows_per_forward`` 1);
- ``step-2-replicas``: step-level batching on two replicas, each reserving half the
  CPUs (scaling out on one machine: each replica is its own process).

Each deployment of one replica reserves all ``--cpus``; every replica runs ``--threads``
torch threads. Workloads, each at concurrency 1, 8 and 32 (closed-loop HTTP clients, one
image per request, PNG answers, after a warm-up round):

- ``uniform``: DDIM 20 steps, classifier-free guidance w = 3;
- ``mixed``: steps in {10, 20, 50}, samplers in {ddim, dpmpp_2m, ddpm}, w in {0, 1, 3},
  drawn per request from a seeded generator; latencies are reported per step count.

The ceiling is ``model.sample`` in this process at the same threads, on a batch as
wide as the step-level forward (DDIM 20 steps, w = 3): the images/s the network gives
when nothing else runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
import ray
import torch
from mlflow import MlflowClient
from ray import serve

from serving.app import build_app
from serving.sampler import generators_for
from training.latent_diffusion import LatentDiffusion
from training.mlflow.registry import log_model_version
from training.presets import get_preset

MODEL_NAME = "bench-serve"
MODES = {  # name: AppConfig fields
    "step": {"max_rows_per_forward": 64},
    "request": {"max_rows_per_forward": 64, "join_running": False},
    "unbatched": {"max_rows_per_forward": 1},
    "step-2-replicas": {"max_rows_per_forward": 64, "num_replicas": 2},
}


def build_model(preset: str) -> LatentDiffusion:
    torch.manual_seed(0)
    return LatentDiffusion.build(get_preset(preset).for_data(32, 1, 10)).eval()


def register(root: Path, model: LatentDiffusion) -> str:
    """``model`` as MODEL_NAME@champion in a new sqlite MLflow; the tracking URI."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("bench", artifact_location=str(root / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    log_model_version(model, uri, run_id, MODEL_NAME, alias="champion")
    return uri


def request_body(workload: str, client: int, index: int) -> dict:
    """The body of request ``index`` of ``client``: the same in every mode."""
    if workload == "uniform":
        settings = {"guidance_scale": 3.0, "sampler": "ddim", "steps": 20}
    else:
        draw = random.Random(client * 100_003 + index)
        settings = {
            "steps": draw.choice([10, 20, 50]),
            "sampler": draw.choice(["ddim", "dpmpp_2m", "ddpm"]),
            "guidance_scale": draw.choice([0.0, 1.0, 3.0]),
        }
    return {"label": (client + index) % 10, "seed": client * 1000 + index} | settings


def one_round(url: str, workload: str, concurrency: int, total: int) -> dict:
    """``total`` requests from ``concurrency`` clients: images/s and latencies by steps."""
    per_client = max(1, total // concurrency)
    latencies: dict[int, list[float]] = {}
    server: list[float] = []  # from arrival at the replica to the answer (X-Elapsed-S)
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            for i in range(per_client):
                body = request_body(workload, index, i)
                started = time.perf_counter()
                response = http.post(f"{url}/v1/samples", json=body)
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code}: {response.text}")
                with lock:
                    latencies.setdefault(body["steps"], []).append(elapsed)
                    server.append(float(response.headers["x-elapsed-s"]))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - started
    count = sum(len(v) for v in latencies.values())
    return {
        "images_per_s": count / wall,
        "requests": count,
        "latencies": latencies,
        "server_p50_s": float(np.percentile(server, 50)),
    }


def bench_mode(args, tracking_uri: str, port: int, mode: str) -> list[dict]:
    replicas = MODES[mode].get("num_replicas", 1)
    app = build_app(
        {
            "model_uri": f"models:/{MODEL_NAME}@champion",
            "tracking_uri": tracking_uri,
            "num_cpus": args.cpus / replicas,
            "torch_threads": args.threads,
            "max_ongoing_requests": 64,
            "reload_interval_s": 0,
        }
        | MODES[mode]
    )
    serve.run(app, name=mode, route_prefix=f"/{mode}")
    url = f"http://127.0.0.1:{port}/{mode}"
    rows = []
    for workload in args.workloads:
        for concurrency in args.concurrency:
            one_round(url, workload, concurrency, concurrency)  # warm-up
            total = max(args.requests if concurrency > 1 else args.requests // 8, concurrency)
            before = httpx.get(f"{url}/v1/model").json()["stats"]
            result = one_round(url, workload, concurrency, total)
            after = httpx.get(f"{url}/v1/model").json()["stats"]
            # Images per forward in this round; /v1/model answers from one replica.
            forwards = after["forwards"] - before["forwards"]
            mean_rows = (
                f"{(after['rows'] - before['rows']) / forwards:.1f}"
                if replicas == 1 and forwards
                else "–"
            )
            rows.append(
                {"mode": mode, "workload": workload, "concurrency": concurrency}
                | result
                | {"mean_rows": mean_rows}
            )
            print(format_row(rows[-1]), flush=True)
    serve.delete(mode)
    return rows


def ceiling(model: LatentDiffusion, threads: int, width: int, steps: int = 20) -> float:
    """Images/s of ``model.sample`` in this process: ``width`` images, DDIM, w = 3."""
    torch.set_num_threads(threads)
    labels = torch.arange(width) % 10

    def run() -> None:
        model.sample(
            labels,
            guidance_scale=3.0,
            sampler="ddim",
            steps=steps,
            generator=generators_for(0, width),
        )

    run()  # warm-up
    started = time.perf_counter()
    run()
    return width / (time.perf_counter() - started)


def format_row(r: dict) -> str:
    by_steps = " / ".join(
        f"{steps}: {np.percentile(v, 50):.2f} / {np.percentile(v, 99):.2f}"
        for steps, v in sorted(r["latencies"].items())
    )
    return (
        f"| {r['mode']} | {r['workload']} | {r['concurrency']} | {r['requests']} | "
        f"{r['images_per_s']:.1f} | {by_steps} | {r['server_p50_s']:.2f} | {r['mean_rows']} |"
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", choices=("tiny", "demo"))
    parser.add_argument("--requests", type=int, default=96, help="per round (1/8 at c=1)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--workloads", nargs="+", default=["uniform", "mixed"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    began = time.perf_counter()
    model = build_model(args.preset)
    print(
        "| mode | workload | concurrency | requests | images/s | p50 / p99 latency (s) by "
        "steps | mean images per forward |"
    )
    print("|---|---|---:|---:|---:|---|---:|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tracking_uri = register(Path(tmp), model)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        try:
            for mode in args.modes:
                rows += bench_mode(args, tracking_uri, port, mode)
        finally:
            serve.shutdown()
            ray.shutdown()
    widths = sorted({min(32, r["concurrency"]) for r in rows})
    ceilings = {w: ceiling(model, args.threads, w) for w in widths}
    print(
        f"\n{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"ray {ray.__version__}; preset {args.preset}, {args.threads} torch thread(s); "
        f"{time.perf_counter() - began:.0f} s in all"
    )
    for width, value in ceilings.items():
        print(f"ceiling: model.sample, {width} images, DDIM 20, w = 3: {value:.1f} images/s")


if __name__ == "__main__":
    main()
