"""Sharding on the local 2-node Ray cluster: the same bytes as the single-process
sharder, a resumed interrupted run, and a driver whose memory does not grow with the
source (read from its peak RSS, not from a time)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data.shard
from data.manifest import ShardOptions
from data.shard import shard_dataset

pytestmark = pytest.mark.integration

OPTIONS = ShardOptions(image_size=16, channels=3, shard_max_samples=64, val_fraction=0.2, seed=5)


def _png(seed: int, size: int = 20) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _rgb_folder(root: Path, count: int) -> Path:
    """``count`` RGB images in 3 class folders, plus inputs that must be skipped."""
    for i in range(count):
        path = root / f"class{i % 3}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(i))
    (root / "class1" / "truncated.png").write_bytes(_png(0)[:40])
    (root / "class2" / "notes.txt").write_text("not an image")
    return root


def _files(url: str, s3_client=None) -> dict[str, bytes]:
    """Every file of a dataset (shards and manifest) by name."""
    if s3_client is None:
        return {p.name: p.read_bytes() for p in Path(url).iterdir() if p.is_file()}
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    listing = s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    keys = [o["Key"] for o in listing.get("Contents", [])]
    return {
        k.rsplit("/", 1)[1]: s3_client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys
    }


def test_ray_tasks_write_the_bytes_the_single_process_sharder_writes(ray_cluster, tmp_path):
    source = str(_rgb_folder(tmp_path / "src", 700))
    alone = shard_dataset(source, str(tmp_path / "threads"), OPTIONS, progress=False)
    one = shard_dataset(
        source, str(tmp_path / "ray1"), OPTIONS, engine="ray", workers=1, progress=False
    )
    four = shard_dataset(source, str(tmp_path / "ray4"), OPTIONS, engine="ray", progress=False)

    expected = _files(str(tmp_path / "threads"))
    assert len(expected) == 1 + 9 + 3  # manifest, 560 train / 64, 140 val / 64
    assert _files(str(tmp_path / "ray1")) == expected
    assert _files(str(tmp_path / "ray4")) == expected
    assert alone.manifest == one.manifest == four.manifest
    skipped = {s.input: s.reason for s in four.manifest.skipped}
    assert skipped.keys() == {"class1/truncated.png", "class2/notes.txt"}
    assert "not a decodable image" in skipped["class1/truncated.png"]


def test_an_s3_source_of_more_than_one_listing_page_shards_alike_on_ray(ray_cluster, s3_session):
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="ldm-ray-shard")
    images = [_png(i % 50, size=8) for i in range(50)]
    for i in range(1_050):  # S3 lists 1,000 keys a page: c0 takes two pages
        client.put_object(
            Bucket="ldm-ray-shard", Key=f"src/c{int(i >= 1_020)}/{i:05d}.png", Body=images[i % 50]
        )
    client.put_object(Bucket="ldm-ray-shard", Key="src/stray.png", Body=images[0])
    options = OPTIONS.model_copy(update={"shard_max_samples": 200})
    source = "s3://ldm-ray-shard/src"
    shard_dataset(source, "s3://ldm-ray-shard/threads", options, progress=False)
    on_ray = shard_dataset(source, "s3://ldm-ray-shard/ray", options, engine="ray", progress=False)

    assert on_ray.manifest.counts == {"train": 840, "val": 210}
    assert on_ray.manifest.class_names == ("c0", "c1")
    assert [(s.input, s.reason) for s in on_ray.manifest.skipped] == [
        ("stray.png", "outside any class folder")
    ]
    expected = _files("s3://ldm-ray-shard/threads", client)
    assert _files("s3://ldm-ray-shard/ray", client) == expected and len(expected) == 8


def test_an_interrupted_ray_shard_run_sends_only_what_is_missing(
    ray_cluster, tmp_path, monkeypatch
):
    source = str(_rgb_folder(tmp_path / "src", 640))
    out = str(tmp_path / "out")
    real = data.shard.write_shards

    def interrupted(*args, **kwargs):
        for done, result in enumerate(real(*args, **kwargs)):
            if done == 4:
                raise KeyboardInterrupt  # the driver stops after 4 shards came back
            yield result

    monkeypatch.setattr(data.shard, "write_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shard_dataset(source, out, OPTIONS, engine="ray", workers=2, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    written = {p.name for p in (tmp_path / "out").glob("*.tar")}
    assert len(written) >= 4

    monkeypatch.setattr(data.shard, "write_shards", real)
    again = shard_dataset(source, out, OPTIONS, engine="ray", workers=2, progress=False)
    assert written <= set(again.reused) and written.isdisjoint(again.uploaded)
    assert len(again.reused) + len(again.uploaded) == len(again.manifest.shards) == 11
    reference = shard_dataset(source, str(tmp_path / "whole"), OPTIONS, progress=False)
    assert _files(out) == _files(str(tmp_path / "whole"))
    assert again.manifest == reference.manifest


_PEAK_RSS = """
import json, resource, sys
from data.manifest import ShardOptions
from flows.sharding import shard_where
options = ShardOptions(image_size=8, channels=1, shard_max_samples=1000, val_fraction=0.1)
done = shard_where(sys.argv[1], sys.argv[2], options, engine="ray", ray_address=sys.argv[3])
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"samples": sum(done.manifest.counts.values()), "peak_mib": peak_mib}))
"""


def _driver_peak(source: Path, out: Path, address: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(source), str(out), address],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"RAY_DEDUP_LOGS": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_ray_driver_memory_does_not_grow_with_the_source(ray_cluster, tmp_path):
    pngs = [_png(i, size=8) for i in range(32)]

    def folder(root: Path, count: int) -> Path:
        for c in range(10):
            (root / f"c{c}").mkdir(parents=True)
        for i in range(count):
            (root / f"c{i % 10}" / f"{i:06d}.png").write_bytes(pngs[i % 32])
        return root

    # Both past the few MiB a driver's buffers take to reach their working size.
    small = _driver_peak(folder(tmp_path / "small", 10_000), tmp_path / "a", ray_cluster.address)
    large = _driver_peak(folder(tmp_path / "large", 50_000), tmp_path / "b", ray_cluster.address)
    assert (small["samples"], large["samples"]) == (10_000, 50_000)
    # 40,000 more inputs: a driver that kept them listed (as this project's sharder did
    # before, ~290 bytes an input) grows by 11 MiB; one that streams them, by about 1,
    # and by up to 5 in a run where the allocator's arenas happened to land otherwise.
    assert large["peak_mib"] - small["peak_mib"] < 7, (small, large)


def test_ldm_shard_with_a_dashboard_url_runs_as_a_ray_job(ray_cluster, s3_session, capsys):
    from flows.cli import main

    options = ShardOptions(channels=1, shard_max_samples=1000)
    shard_dataset("mnist", "s3://ldm-data/mnist-threads", options, progress=False)
    url = "s3://ldm-data/mnist-ray-job"
    code = main(
        ["shard", "mnist", url, "--shard-max-samples", "1000", "--ray", ray_cluster.dashboard_url]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "submitted Ray Job" in out and "Wrote 5,000 samples (4,500 train, 500 val)" in out
    import boto3

    client = boto3.client("s3")
    assert _files(url, client) == _files("s3://ldm-data/mnist-threads", client)


def test_an_interrupted_latent_cache_encodes_only_the_missing_shards(
    ray_cluster, mnist_url, tmp_path
):
    import boto3
    import torch

    from training.checkpoints import StageState, save_checkpoint
    from training.models import Autoencoder
    from training.presets import get_preset
    from training.ray.latent_cache import cache_latents

    config = get_preset("tiny")  # 32×32, 1 channel: the digits' format
    torch.manual_seed(0)
    autoencoder = Autoencoder(config.autoencoder)
    optimizer = torch.optim.AdamW(autoencoder.parameters()).state_dict()
    state = StageState("autoencoder", 0, 0, 0, autoencoder.state_dict(), optimizer, {})
    checkpoint = str(save_checkpoint(tmp_path / "ae", state, config))
    out = "s3://ldm-runs/latent-resume"
    first = cache_latents(mnist_url, checkpoint, out, config)

    client = boto3.client("s3")

    def shards() -> dict[str, str]:  # name → ETag of every latent shard
        listing = client.list_objects_v2(Bucket="ldm-runs", Prefix="latent-resume/train-")
        return {o["Key"]: o["ETag"] + str(o["LastModified"]) for o in listing["Contents"]}

    before = shards()
    manifest = client.get_object(Bucket="ldm-runs", Key="latent-resume/manifest.json")
    # an interruption: no manifest yet, one shard never written
    client.delete_object(Bucket="ldm-runs", Key="latent-resume/manifest.json")
    lost = sorted(before)[1]
    client.delete_object(Bucket="ldm-runs", Key=lost)
    # LastModified has one-second resolution and a re-encoded shard has the same ETag:
    # the re-run starts in a later second, so any shard it writes shows a new LastModified
    time.sleep(1.1)
    assert cache_latents(mnist_url, checkpoint, out, config) == first
    after = shards()
    assert after.keys() == before.keys()  # the lost shard is back
    assert {k for k in before if after[k] != before[k]} == {lost}  # only it was encoded
    again = client.get_object(Bucket="ldm-runs", Key="latent-resume/manifest.json")
    assert again["Body"].read() == manifest["Body"].read()


def test_a_shard_whose_worker_is_killed_is_written_again_by_ray(ray_cluster, tmp_path):
    import signal
    import threading
    import time

    import psutil

    source = str(_rgb_folder(tmp_path / "src", 1_500))
    options = OPTIONS.model_copy(update={"shard_max_samples": 600, "val_fraction": 0.0})
    killed: list[int] = []
    stop = threading.Event()

    def kill_the_first_shard_writer() -> None:
        while not stop.is_set() and not killed:
            for process in psutil.process_iter(["cmdline"]):
                if (process.info["cmdline"] or [""])[0].startswith("ray::_run"):
                    process.send_signal(signal.SIGKILL)
                    killed.append(process.pid)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_first_shard_writer)
    killer.start()
    try:
        report = shard_dataset(
            source, str(tmp_path / "ray"), options, engine="ray", workers=2, progress=False
        )
    finally:
        stop.set()
        killer.join()
    assert killed, "no shard writer was seen running"
    reference = shard_dataset(source, str(tmp_path / "threads"), options, progress=False)
    assert report.manifest == reference.manifest
    assert _files(str(tmp_path / "ray")) == _files(str(tmp_path / "threads"))
