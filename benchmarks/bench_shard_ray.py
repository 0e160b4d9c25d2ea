"""Sharding on Ray against the single-process sharder, and the memory of both sides.

    .venv/bin/python benchmarks/bench_shard_ray.py [--images 20000] [--memory-images 200000]
        [--out benchmarks/RESULTS.md]

- throughput (images/s): one folder of 64×64 RGB PNGs in 10 class folders, sharded to
  32×32 RGB by ``shard_dataset`` in one process (threads, one per CPU) and by Ray tasks
  on a 2-node Ray cluster on this machine (one CPU per node) with 1 and 2 tasks at
  once, in the same run; every engine's files are compared byte for byte;
- memory: a folder of tiny PNGs (8×8) sharded on Ray by a driver process at 1/10 and
  all of ``--memory-images``: the driver's peak RSS (``ru_maxrss``) for both, and the
  Ray workers' peak RSS (``VmHWM``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_data import make_folder
from benchmarks.report import publish
from data.manifest import ShardOptions
from data.shard import shard_dataset

OPTIONS = ShardOptions(image_size=32, channels=3, shard_max_samples=1000, val_fraction=0.1)

_DRIVER = """
import json, sys
from data.manifest import ShardOptions
from flows.sharding import shard_where
from training.ray.connection import connect_ray

def mib(field):
    line = [l for l in open("/proc/self/status") if l.startswith(field)][0]
    return int(line.split()[1]) / 1024

connect_ray(sys.argv[3])
before = mib("VmRSS:")
options = ShardOptions(image_size=8, channels=1, shard_max_samples=1000, val_fraction=0.1)
done = shard_where(sys.argv[1], sys.argv[2], options, engine="ray", ray_address=sys.argv[3])
print(json.dumps({"samples": sum(done.manifest.counts.values()), "before_mib": before,
                  "after_mib": mib("VmRSS:"), "peak_mib": mib("VmHWM:")}))
"""


def tiny_folder(root: Path, count: int) -> str:
    """``count`` 8×8 PNGs (32 distinct ones, repeated) in 10 class folders."""
    pngs = []
    for i in range(32):
        buffer = io.BytesIO()
        pixels = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / f"c{i % 10}" / f"{i:07d}.png").write_bytes(pngs[i % 32])
    return str(root)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def throughput(source: str, count: int, tmp: Path) -> list[str]:
    import ray

    runs = {}
    started = time.perf_counter()
    shard_dataset(source, str(tmp / "threads"), OPTIONS, progress=False)
    runs["single process (threads, 1 per CPU)"] = time.perf_counter() - started
    for workers in (1, 2):
        ray.get(ray.remote(num_cpus=1)(lambda: 0).remote())  # workers started
        started = time.perf_counter()
        out = tmp / f"ray{workers}"
        shard_dataset(source, str(out), OPTIONS, progress=False, engine="ray", workers=workers)
        runs[f"Ray, {workers} task{'s' if workers > 1 else ''} at once"] = (
            time.perf_counter() - started
        )
        if files(out) != files(tmp / "threads"):
            raise SystemExit(f"Ray with {workers} tasks wrote other bytes than one process")
    base = runs["single process (threads, 1 per CPU)"]
    rows = ["| engine | seconds | images/s | × single process |", "|---|---:|---:|---:|"]
    for name, seconds in runs.items():
        rows.append(f"| {name} | {seconds:.1f} | {count / seconds:,.0f} | {base / seconds:.2f} |")
    return rows + ["", "Every engine's shards and manifest are byte-identical (checked)."]


def worker_peaks_mib() -> list[float]:
    """Peak RSS (VmHWM) of every Ray worker process on this machine."""
    import psutil

    peaks = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "default_worker.py" not in cmdline and not cmdline.startswith("ray::"):
            continue
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return peaks


def memory(count: int, address: str, tmp: Path) -> list[str]:
    rows = [
        "| inputs | driver RSS before sharding (MiB) | after (MiB) | peak (MiB) |",
        "|---:|---:|---:|---:|",
    ]
    for n in (count // 10, count):
        source = tiny_folder(tmp / f"tiny{n}", n)
        result = subprocess.run(
            [sys.executable, "-c", _DRIVER, source, str(tmp / f"tiny-out{n}"), address],
            capture_output=True,
            text=True,
            check=True,
        )
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        assert measured["samples"] == n, measured
        rows.append(
            f"| {n:,} | {measured['before_mib']:.1f} | {measured['after_mib']:.1f} "
            f"| {measured['peak_mib']:.1f} |"
        )
    peaks = worker_peaks_mib()
    rows += ["", f"Ray workers' peak RSS: {', '.join(f'{p:.0f}' for p in sorted(peaks))} MiB."]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--memory-images", type=int, default=200_000)
    parser.add_argument("--out", type=Path, default=None, help="append the results here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-shard-ray-") as folder:
            tmp = Path(folder)
            source = make_folder(tmp / "src", args.images)
            speed = throughput(source, args.images, tmp)
            mem = memory(args.memory_images, cluster.address, tmp)
    finally:
        ray.shutdown()
        cluster.shutdown()
    command = " ".join(["benchmarks/bench_shard_ray.py", *sys.argv[1:]])
    text = "\n".join(
        [
            f"## Sharding on Ray ({time.strftime('%Y-%m-%d')})",
            "",
            f"Machine: {platform.platform()}, {os.cpu_count()} CPUs. Command: `{command}`. "
            f"{args.images:,} 64×64 RGB PNGs → 32×32 RGB, shards of 1,000; Ray: a 2-node "
            "cluster on this machine, one CPU per node.",
            "",
            *speed,
            "",
            f"Memory: 8×8 PNGs sharded by a Ray driver (2 nodes), at {args.memory_images // 10:,} "
            f"and {args.memory_images:,} inputs.",
            "",
            *mem,
            "",
        ]
    )
    publish(text, args.out)


if __name__ == "__main__":
    main()
