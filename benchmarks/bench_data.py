"""Throughput of the data package, each number next to a baseline measured in the same run.

    .venv/bin/python benchmarks/bench_data.py [--images 5000] [--out benchmarks/RESULTS.md]

- sharding (images/s): ``shard_dataset`` from a source to a local folder and to a local
  S3 server (SeaweedFS ``weed mini``, started and stopped here), against plain
  ``tarfile`` writing the same PNG bytes (plus a boto3 ``upload_file`` for S3);
- reading per rank (images/s): ``build_loader`` (rank 0 of 2, batch 64) over 20,000
  32×32 RGB images in shards of 1,000, with 0 and 2 DataLoader workers, from a folder
  and from S3, against plain ``tarfile`` reading the same shards and decoding the same
  PNGs in one process.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import storage
from data.manifest import ShardOptions, load_manifest
from data.reader import assign_shards, build_loader
from data.shard import shard_dataset
from flows.local_stack import weed_ports

KEY, SECRET = "bench-key", "bench-secret"


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def make_folder(root: Path, count: int, size: int = 64) -> str:
    """``count`` RGB PNGs of size×size in 10 class folders (smooth noise, PNG-friendly)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)
        path = root / f"class{i % 10}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return str(root)


def make_npz(path: Path, count: int, size: int = 32) -> str:
    """``count`` RGB images of size×size (smooth noise) with 10 labels, as one ``.npz``."""
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (count, size // 4, size // 4, 3), dtype=np.uint8)
    images = small.repeat(4, axis=1).repeat(4, axis=2)
    np.savez(path, images=images, labels=np.arange(count) % 10)
    return str(path)


def png_samples(folder: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every member of every shard the pipeline wrote."""
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                yield member.name, tar.extractfile(member).read()


def baseline_write(members: list[tuple[str, bytes]], out: Path, per_shard: int) -> list[Path]:
    """Plain tarfile: the same members, the same samples per shard."""
    out.mkdir(parents=True, exist_ok=True)
    paths, per_tar = [], per_shard * 3
    for start in range(0, len(members), per_tar):
        path = out / f"plain-{start // per_tar:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for name, data in members[start : start + per_tar]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def baseline_read(streams: list[Callable[[], object]]) -> int:
    """Plain tarfile over the shards, decoding every PNG to a uint8 array."""
    count = 0
    for open_stream in streams:
        with tarfile.open(fileobj=open_stream(), mode="r|") as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name.endswith(".png"):
                    np.asarray(Image.open(io.BytesIO(data)))
                    count += 1
    return count


@contextmanager
def s3_server(folder: Path) -> Iterator[str]:
    """SeaweedFS on free 127.0.0.1 ports; the environment points boto3 at it."""
    ports = weed_ports(5)
    folder.mkdir(parents=True, exist_ok=True)
    weed = str(Path(sys.executable).parent / "weed")
    master, volume, filer, s3, admin = ports
    command = [
        weed,
        f"-logdir={folder}",
        "mini",
        f"-dir={folder}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        f"-s3.port={s3}",
        f"-admin.port={admin}",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    log = open(folder / "weed.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{s3}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID=KEY,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                storage.s3_client().list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start; see {folder}/weed.log") from None
                time.sleep(0.2)
        storage.s3_client().create_bucket(Bucket="bench")
        yield endpoint
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(15)
        log.close()
        for port in ports:  # unix sockets weed leaves in /tmp, named after a port
            for name in (port, port + 10000):
                for path in Path("/tmp").glob(f"seaweedfs-*-{name}.sock"):
                    path.unlink(missing_ok=True)


def bench_sharding(name: str, source: str, options: ShardOptions, tmp: Path) -> list[str]:
    rows = []
    local = tmp / f"{name}-local"
    seconds = timed(lambda: shard_dataset(source, str(local), options, progress=False))
    manifest = load_manifest(str(local))
    count = sum(manifest.counts.values())
    members = list(png_samples(local))
    plain = timed(lambda: baseline_write(members, tmp / f"{name}-plain", options.shard_max_samples))
    rows.append(_row(f"shard {name} → folder", count, seconds, plain, "tarfile write"))

    out = f"s3://bench/{name}"
    seconds = timed(lambda: shard_dataset(source, out, options, progress=False))

    def plain_s3() -> None:
        client = storage.s3_client()
        for path in baseline_write(members, tmp / f"{name}-plain-s3", options.shard_max_samples):
            client.upload_file(str(path), "bench", f"plain/{name}/{path.name}")

    rows.append(
        _row(f"shard {name} → S3", count, seconds, timed(plain_s3), "tarfile write + upload")
    )
    return rows


def shard_streams(url: str, names: list[str]) -> list[Callable[[], object]]:
    """Openers of the given shards for the baseline reader (boto3 or a local file)."""
    if not url.startswith("s3://"):
        return [lambda n=n: open(Path(url) / n, "rb") for n in names]
    client, prefix = storage.s3_client(), url.removeprefix("s3://bench/")
    return [
        lambda n=n: client.get_object(Bucket="bench", Key=f"{prefix}/{n}")["Body"] for n in names
    ]


def bench_reading(name: str, url: str) -> list[str]:
    manifest = load_manifest(url)
    mine = [s.name for s in assign_shards(manifest.split_shards("train"), 2, 0, 0)[0]]
    rows = []
    for workers in (0, 2):
        loader = build_loader(url, "train", 0, 2, 64, seed=0, epoch=0, num_workers=workers)
        seconds = timed(lambda loader=loader: sum(1 for _ in loader))
        count = len(loader) * 64
        streams = shard_streams(url, mine)
        started = time.perf_counter()
        plain_count = baseline_read(streams)
        plain = (time.perf_counter() - started) * count / plain_count
        label = f"read {name}, rank 0 of 2, {workers} workers"
        rows.append(_row(label, count, seconds, plain, "tarfile read + PNG decode"))
    return rows


def _row(what: str, count: int, seconds: float, baseline_seconds: float, baseline: str) -> str:
    ours, plain = count / seconds, count / baseline_seconds
    return f"| {what} | {count:,} | {ours:,.0f} | {plain:,.0f} ({baseline}) | {ours / plain:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000, help="images in the folder source")
    parser.add_argument(
        "--read-images", type=int, default=20000, help="images in the reading benchmark"
    )
    parser.add_argument("--out", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp_name:
        tmp = Path(tmp_name)
        folder = make_folder(tmp / "src", args.images)
        with s3_server(tmp / "weed"):
            mnist = ShardOptions(image_size=32, channels=1, shard_max_samples=500)
            rgb = ShardOptions(image_size=32, channels=3, shard_max_samples=500)
            rows += bench_sharding("mnist", "mnist", mnist, tmp)
            rows += bench_sharding("folder", folder, rgb, tmp)
            npz = make_npz(tmp / "reading.npz", args.read_images)
            big = ShardOptions(image_size=32, channels=3, shard_max_samples=1000, val_fraction=0)
            shard_dataset(npz, str(tmp / "reading"), big, progress=False)
            shard_dataset(npz, "s3://bench/reading", big, progress=False)
            rows += bench_reading("local", str(tmp / "reading"))
            rows += bench_reading("S3", "s3://bench/reading")
    header = [
        f"Run {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"load average before {os.getloadavg()[0]:.2f}.",
        "",
        "| what | images | ours (images/s) | baseline (images/s) | ours / baseline |",
        "|---|---:|---:|---:|---:|",
    ]
    table = "\n".join(header + rows)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
