"""Sharding to and reading from a real S3 server (SeaweedFS), and the errors a user sees
when the bucket, the credentials or the endpoint are wrong."""

from __future__ import annotations

import hashlib
import io
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from data import storage
from data.manifest import ShardOptions, load_manifest
from data.reader import build_loader
from data.shard import shard_dataset
from data.storage import StorageError

pytestmark = pytest.mark.integration

OPTIONS = ShardOptions(image_size=16, channels=3, shard_max_samples=16, val_fraction=0.25, seed=3)


def _source_images(count: int = 90, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 16, 16, 3), dtype=np.uint8)
    return images, np.arange(count) % classes


def _upload_folder(client, bucket: str, images: np.ndarray, labels: np.ndarray) -> str:
    """The images as PNG files under s3://bucket/src/<class>/NNN.png."""
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        client.put_object(
            Bucket=bucket, Key=f"src/class{label}/{i:03d}.png", Body=buffer.getvalue()
        )
    client.put_object(Bucket=bucket, Key="src/class0/notes.txt", Body=b"not an image")
    return f"s3://{bucket}/src"


def _read_all(url: str, split: str, num_workers: int = 0) -> list[tuple[bytes, int]]:
    loader = build_loader(url, split, 0, 1, 1, seed=0, epoch=0, num_workers=num_workers)
    out = []
    for x, y in loader:
        pixels = ((x[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8)
        out.append((pixels.numpy().tobytes(), int(y[0])))
    return out


def _keys(client, bucket: str, prefix: str) -> list[str]:
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_s3_folder_to_s3_shards_reads_back_every_sample(s3_env):
    client = s3_env.client()
    images, labels = _source_images()
    source = _upload_folder(client, s3_env.bucket, images, labels)
    out = f"s3://{s3_env.bucket}/datasets/toy"

    report = shard_dataset(source, out, OPTIONS, progress=False)

    manifest = load_manifest(out)
    assert manifest.class_names == ("class0", "class1", "class2")
    assert manifest.counts == {"train": 68, "val": 22}
    assert [s.input for s in manifest.skipped] == ["class0/notes.txt"]
    names = {f"datasets/toy/{s.name}" for s in manifest.shards} | {"datasets/toy/manifest.json"}
    assert set(_keys(client, s3_env.bucket, "datasets/toy/")) == names
    for shard in manifest.shards:
        body = client.get_object(Bucket=s3_env.bucket, Key=f"datasets/toy/{shard.name}")["Body"]
        assert hashlib.sha256(body.read()).hexdigest() == shard.sha256
    assert "90 samples" in report.summary() and out in report.summary()

    pairs = zip(images, labels, strict=True)
    expected = sorted((image.tobytes(), int(label)) for image, label in pairs)
    read = _read_all(out, "train", num_workers=2) + _read_all(out + "/manifest.json", "val")
    assert sorted(read) == expected


def test_rerun_uploads_only_the_missing_shard(s3_env, monkeypatch, tmp_path):
    client = s3_env.client()
    images, labels = _source_images(60)
    npz = tmp_path / "toy.npz"
    np.savez(npz, images=images, labels=labels)
    out = f"s3://{s3_env.bucket}/toy"
    first = shard_dataset(str(npz), out, OPTIONS, progress=False)
    etags = {
        k: client.head_object(Bucket=s3_env.bucket, Key=k)["ETag"]
        for k in _keys(client, s3_env.bucket, "toy/")
    }

    client.delete_object(Bucket=s3_env.bucket, Key="toy/train-000001.tar")
    client.delete_object(Bucket=s3_env.bucket, Key="toy/manifest.json")
    uploads: list[str] = []
    real_put = storage.put_file
    monkeypatch.setattr(
        storage,
        "put_file",
        lambda local, url, **kw: (uploads.append(url), real_put(local, url, **kw)),
    )
    second = shard_dataset(str(npz), out, OPTIONS, progress=False)

    assert uploads == [f"{out}/train-000001.tar"]
    assert second.uploaded == ("train-000001.tar",)
    assert len(second.reused) == len(first.manifest.shards) - 1
    assert second.manifest == first.manifest
    after = {
        k: client.head_object(Bucket=s3_env.bucket, Key=k)["ETag"]
        for k in _keys(client, s3_env.bucket, "toy/")
    }
    assert after == etags  # byte-identical, manifest included


def test_reader_reports_a_damaged_s3_shard(s3_env, tmp_path):
    client = s3_env.client()
    images, labels = _source_images(40)
    np.savez(tmp_path / "toy.npz", images=images, labels=labels)
    out = f"s3://{s3_env.bucket}/toy"
    manifest = shard_dataset(str(tmp_path / "toy.npz"), out, OPTIONS, progress=False).manifest
    shard = manifest.split_shards("train")[0]
    body = bytearray(
        client.get_object(Bucket=s3_env.bucket, Key=f"toy/{shard.name}")["Body"].read()
    )
    body[512 + 100] ^= 0xFF  # the padding after the first member: same size, tar still parses
    client.put_object(Bucket=s3_env.bucket, Key=f"toy/{shard.name}", Body=bytes(body))
    loader = build_loader(out, "train", 0, 1, 1, 0, 0, num_workers=0, shuffle_buffer=0)
    with pytest.raises(StorageError, match=f"shard {out}/{shard.name} does not match the manifest"):
        list(loader)

    client.delete_object(Bucket=s3_env.bucket, Key=f"toy/{shard.name}")
    with pytest.raises(
        StorageError, match=f"shard {out}/{shard.name} is listed in the manifest but missing"
    ):
        build_loader(out, "train", 0, 1, 4, 0, 0)


def _no_manifest(s3_env, key: str) -> bool:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_env.server.endpoint,
        aws_access_key_id=s3_env.server.access_key,
        aws_secret_access_key=s3_env.server.secret_key,
        region_name="us-east-1",
    )
    return not _keys(client, s3_env.bucket, key)


def test_missing_bucket_says_so(s3_env):
    with pytest.raises(
        StorageError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1"
    ):
        shard_dataset("mnist", "s3://no-such-bucket/ds", OPTIONS, progress=False)


def test_rejected_credentials_say_so_and_write_nothing(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StorageError, match="refused the credentials"):
        shard_dataset("mnist", f"s3://{s3_env.bucket}/ds", OPTIONS, progress=False)
    assert _no_manifest(s3_env, "ds/")


def test_missing_credentials_say_so(s3_env, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="no AWS credentials found"):
        shard_dataset("mnist", f"s3://{s3_env.bucket}/ds", OPTIONS, progress=False)
    assert _no_manifest(s3_env, "ds/")


def test_unreachable_endpoint_says_so(s3_env, monkeypatch):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    with pytest.raises(
        StorageError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{closed}"
    ):
        shard_dataset("mnist", f"s3://{s3_env.bucket}/ds", OPTIONS, progress=False)
    with pytest.raises(StorageError, match="cannot reach"):
        build_loader(f"s3://{s3_env.bucket}/ds", "train", 0, 1, 4, 0, 0)


def test_large_shards_go_up_as_multipart_and_read_back(s3_env, monkeypatch, tmp_path):
    monkeypatch.setattr(storage, "MULTIPART_BYTES", 5 * 1024 * 1024)  # S3's smallest part
    images, labels = _source_images(2600)  # one shard of ~8 MB (tar headers dominate)
    np.savez(tmp_path / "big.npz", images=images, labels=labels)
    out = f"s3://{s3_env.bucket}/big"
    options = OPTIONS.model_copy(update={"shard_max_samples": 5000, "val_fraction": 0.0})
    manifest = shard_dataset(str(tmp_path / "big.npz"), out, options, progress=False).manifest
    (shard,) = manifest.shards
    assert shard.num_bytes > 5 * 1024 * 1024
    head = s3_env.client().head_object(Bucket=s3_env.bucket, Key=f"big/{shard.name}")
    assert head["ETag"].strip('"').endswith("-2")  # two parts
    assert head["Metadata"]["sha256"] == shard.sha256
    loader = build_loader(out, "train", 0, 1, 100, 0, 0, num_workers=0)
    assert sum(len(y) for _, y in loader) == 2600


def test_stream_resumes_after_a_dropped_connection(s3_env):
    client = s3_env.client()
    payload = bytes(range(256)) * 4096  # 1 MiB
    client.put_object(Bucket=s3_env.bucket, Key="blob", Body=payload)
    stream = storage.open_stream(f"s3://{s3_env.bucket}/blob")
    head = stream.read(1000)
    dropped = stream._body
    dropped.close()  # the connection drops mid-object
    rest = stream.read()
    assert stream._body is not dropped  # reopened with a ranged GET
    assert head + rest == payload


def test_npz_source_on_s3_to_a_local_folder(s3_env, tmp_path):
    images, labels = _source_images(30)
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=np.where(labels == 2, 9, labels))
    s3_env.client().put_object(Bucket=s3_env.bucket, Key="in/toy.npz", Body=buffer.getvalue())
    report = shard_dataset(
        f"s3://{s3_env.bucket}/in/toy.npz", str(tmp_path), OPTIONS, progress=False
    )
    manifest = report.manifest
    assert manifest.class_names == tuple(str(i) for i in range(10))
    assert sum(manifest.counts.values()) == 30 and manifest.skipped == ()
    assert manifest.source == f"s3://{s3_env.bucket}/in/toy.npz"
