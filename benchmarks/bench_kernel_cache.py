"""A sampling engine's images/s over many rounds of the mixed load, with oneDNN's
default kernel cache against the engine's (``serving.engine.ONEDNN_CACHE_CAPACITY``).

    .venv/bin/python benchmarks/bench_kernel_cache.py [--rounds 10] [--seconds 15]

Starts two engine processes with the ``step-bf16`` replica's settings of
``benchmarks/bench_serve.py`` (the app's default on a CPU with native bf16): one with
``ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024`` (oneDNN's default) and one as the app starts
it. The same closed-loop clients feed them without Ray or HTTP (as ``bench_serve.py
--engine-alone`` does) in rounds ordered ABBA, so that both meet the VM's drift alike,
with the ceiling (``model.sample`` in this process at the same width) measured around
every round. Each round prints its images/s, its ratio to the mean of the ceilings
either side and the engine's resident memory; the last lines compare the two engines
over the second half of their rounds, once each has seen the load's widths for a while.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import psutil
import torch

from benchmarks.bench_serve import EngineTarget, build_model, ceiling, engine_alone, measure
from serving.engine import ONEDNN_CACHE_CAPACITY, EngineProcess

MODE = "step-bf16"
CACHES = {"oneDNN's default (1024)": "1024", f"the engine's ({ONEDNN_CACHE_CAPACITY})": None}


def start(bench, model, capacity: str | None) -> EngineProcess:
    """The ``MODE`` replica's engine with ``capacity`` in its environment (None: as the
    app starts it)."""
    saved = os.environ.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    if capacity is not None:
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = capacity
    try:
        return engine_alone(bench, "sqlite:///unused.db", MODE, model)  # no registry read
    finally:
        os.environ.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
        if saved is not None:
            os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", choices=("tiny", "demo"))
    parser.add_argument("--rounds", type=int, default=10, help="in all, both engines")
    parser.add_argument("--seconds", type=float, default=15.0, help="per round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workload", default="mixed", choices=("uniform", "mixed", "short"))
    args = parser.parse_args()
    began = time.perf_counter()
    model = build_model(args.preset)
    bench = types.SimpleNamespace(cpus=2, threads=1)
    names = list(CACHES)
    engines = {name: start(bench, model, capacity) for name, capacity in CACHES.items()}
    width = min(32, args.concurrency)
    ceilings = [ceiling(model, bench.threads, width, args.workload, "bf16")]
    ratios: dict[str, list[float]] = {name: [] for name in names}
    print("| round | kernel cache | images/s | against the ceiling | engine RSS (MiB) |")
    print("|---:|---|---:|---:|---:|")
    try:
        for round_ in range(args.rounds):
            name = names[(round_ + 1) // 2 % 2]  # A B B A A B B A ...
            engine = engines[name]
            target = EngineTarget(engine, model)
            result = measure(target, MODE, args.workload, args.concurrency, args.seconds)
            ceilings.append(ceiling(model, bench.threads, width, args.workload, "bf16"))
            ratio = result["images_per_s"] / np.mean(ceilings[-2:])
            ratios[name].append(ratio)
            rss = psutil.Process(engine.pid).memory_info().rss / 2**20
            print(
                f"| {round_} | {name} | {result['images_per_s']:.1f} | {ratio:.3f} | {rss:.0f} |",
                flush=True,
            )
    finally:
        for engine in engines.values():
            engine.close()
    print()
    late = {name: values[len(values) // 2 :] for name, values in ratios.items()}
    for name in names:
        print(f"{name}: second half against the ceiling {np.mean(late[name]):.3f} (mean)")
    gain = np.mean(late[names[1]]) / np.mean(late[names[0]])
    print(f"the engine's cache over the default: {gain:.2f}×")
    print(
        f"\n{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; preset "
        f"{args.preset}, {args.workload} load at {args.concurrency}, {args.seconds:.0f} s "
        f"rounds; {time.perf_counter() - began:.0f} s in all"
    )


if __name__ == "__main__":
    main()
