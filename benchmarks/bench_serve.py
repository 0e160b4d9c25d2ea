"""Sampling throughput and latency of the Serve app with batching on and off.

    .venv/bin/python benchmarks/bench_serve.py [--preset demo] [--steps 20] [--threads 1]

Registers an untrained model of ``--preset`` in a temporary sqlite MLflow, starts a
local Ray (``--cpus``) and Serve on 127.0.0.1, and deploys the app twice, one after
the other: batching on (``max_batch_size`` 32) and off (``max_batch_size`` 1). Each
deployment is one replica reserving all ``--cpus`` and running ``--threads`` torch
threads (1 by default: on 2 cores, the HTTP proxy and the clients need the other
one, and 2 threads made small batches 2-3× slower there). At each concurrency
(1, 8, 32) closed-loop HTTP clients send one-image requests (DDIM, ``--steps`` steps,
classifier-free guidance w = 3, PNG answer) after a warm-up round; images/s is the
images of the round over its wall time, latencies are per request at the client.
"""

from __future__ import annotations

import argparse
import os
import platform
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
from training.latent_diffusion import LatentDiffusion
from training.mlflow.registry import log_model_version
from training.presets import get_preset

MODEL_NAME = "bench-serve"


def register(root: Path, preset: str) -> str:
    """An untrained ``preset`` model as MODEL_NAME@champion; the tracking URI."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("bench", artifact_location=str(root / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    torch.manual_seed(0)
    model = LatentDiffusion.build(get_preset(preset).for_data(32, 1, 10))
    log_model_version(model, uri, run_id, MODEL_NAME, alias="champion")
    return uri


def one_round(
    url: str, concurrency: int, total: int, steps: int
) -> tuple[float, np.ndarray, float]:
    """``total`` requests from ``concurrency`` clients: images/s, the latencies (s) and the
    mean network time of the batch each request was in (s, measured by the server)."""
    per_client = max(1, total // concurrency)
    latencies: list[float] = []
    sampling: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            for i in range(per_client):
                body = {
                    "label": (index + i) % 10,
                    "guidance_scale": 3.0,
                    "sampler": "ddim",
                    "steps": steps,
                    "seed": index * 1000 + i,
                }
                started = time.perf_counter()
                response = http.post(f"{url}/v1/samples", json=body)
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code}: {response.text}")
                with lock:
                    latencies.append(elapsed)
                    sampling.append(float(response.headers["x-sampling-s"]))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - started
    return len(latencies) / wall, np.asarray(latencies), float(np.mean(sampling))


def bench_mode(args, tracking_uri: str, port: int, name: str, max_batch_size: int) -> list[dict]:
    app = build_app(
        {
            "model_uri": f"models:/{MODEL_NAME}@champion",
            "tracking_uri": tracking_uri,
            "num_cpus": args.cpus,
            "torch_threads": args.threads,
            "max_batch_size": max_batch_size,
            "batch_wait_timeout_s": args.batch_wait_timeout_s,
            "max_ongoing_requests": 64,
            "reload_interval_s": 0,
        }
    )
    serve.run(app, name=name, route_prefix=f"/{name}")
    url = f"http://127.0.0.1:{port}/{name}"
    rows = []
    for concurrency in args.concurrency:
        one_round(url, concurrency, concurrency, args.steps)  # warm-up
        total = max(args.requests if concurrency > 1 else args.requests // 8, concurrency)
        images_per_s, latencies, sampling_s = one_round(url, concurrency, total, args.steps)
        stats = httpx.get(f"{url}/v1/model").json()["stats"]
        rows.append(
            {
                "batching": f"on (max_batch_size {max_batch_size})"
                if max_batch_size > 1
                else "off (max_batch_size 1)",
                "concurrency": concurrency,
                "requests": len(latencies),
                "images_per_s": images_per_s,
                "p50_s": float(np.percentile(latencies, 50)),
                "p99_s": float(np.percentile(latencies, 99)),
                "sampling_s": sampling_s,
                "max_group": stats["max_group_requests"],
            }
        )
        print(rows[-1], flush=True)
    serve.delete(name)
    return rows


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", choices=("tiny", "demo"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=128, help="per round (1/8 at c=1)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tracking_uri = register(Path(tmp), args.preset)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        try:
            rows = bench_mode(args, tracking_uri, port, "batched", 32)
            rows += bench_mode(args, tracking_uri, port, "unbatched", 1)
        finally:
            serve.shutdown()
            ray.shutdown()
    print(
        f"\n{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"ray {ray.__version__}; preset {args.preset}, DDIM {args.steps} steps, CFG w=3, "
        f"1 image/request; {time.perf_counter() - began:.0f} s in all\n"
    )
    print(
        "| batching | concurrency | requests | images/s | p50 latency (s) | p99 latency (s) "
        "| network s per batch | largest group |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batching']} | {r['concurrency']} | {r['requests']} | "
            f"{r['images_per_s']:.1f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | "
            f"{r['sampling_s']:.3f} | {r['max_group']} |"
        )


if __name__ == "__main__":
    main()
