"""The writer on local folders: determinism, resume, the manifest, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import storage
from data.manifest import Manifest, ShardOptions, load_manifest
from data.shard import shard_dataset, split_order

OPTIONS = ShardOptions(image_size=16, channels=3, shard_max_samples=20, val_fraction=0.2, seed=1)


def _folder(root: Path, count: int = 90) -> str:
    rng = np.random.default_rng(0)
    for i in range(count):
        path = root / f"class{i % 3}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return str(root)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_source_and_options_give_byte_identical_shards(tmp_path):
    source = _folder(tmp_path / "src")
    first = shard_dataset(source, str(tmp_path / "a"), OPTIONS, workers=1, progress=False)
    shard_dataset(source, str(tmp_path / "b"), OPTIONS, workers=4, progress=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert sorted(_files(tmp_path / "a")) == [
        "manifest.json",
        *(f"train-00000{i}.tar" for i in range(4)),
        "val-000000.tar",
    ]
    reseeded = shard_dataset(
        source, str(tmp_path / "c"), OPTIONS.model_copy(update={"seed": 2}), progress=False
    )
    assert reseeded.manifest.fingerprint != first.manifest.fingerprint
    assert _files(tmp_path / "c")["train-000000.tar"] != _files(tmp_path / "a")["train-000000.tar"]


def test_manifest_describes_every_shard(tmp_path):
    source = _folder(tmp_path / "src")
    report = shard_dataset(source, str(tmp_path / "out"), OPTIONS, progress=False)
    manifest = load_manifest(str(tmp_path / "out" / "manifest.json"))
    assert manifest == report.manifest
    assert (manifest.image_size, manifest.channels) == (16, 3)
    assert manifest.class_names == ("class0", "class1", "class2")
    assert manifest.counts == {"train": 72, "val": 18}
    assert manifest.source == str((tmp_path / "src").resolve())
    for shard in manifest.shards:
        path = tmp_path / "out" / shard.name
        assert shard.num_bytes == path.stat().st_size
        assert shard.sha256 == storage.sha256_file(path)
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert len(names) == 3 * shard.num_samples  # png, cls, json per sample
        assert {n.split(".", 1)[1] for n in names} == {"png", "cls", "json"}
    summary = report.summary()
    assert "90 samples (72 train, 18 val)" in summary and "5 shards" in summary
    assert str(tmp_path / "out") in summary and "0 inputs skipped" in summary


def test_split_is_a_seeded_permutation():
    train, val = split_order(10, OPTIONS)
    assert sorted(train + val) == list(range(10)) and len(val) == 2
    assert (train, val) == split_order(10, OPTIONS)
    assert split_order(10, OPTIONS.model_copy(update={"val_fraction": 0.0}))[1] == []


def test_rerun_after_losing_a_shard_rewrites_only_that_shard(tmp_path):
    source, out = _folder(tmp_path / "src"), tmp_path / "out"
    shard_dataset(source, str(out), OPTIONS, progress=False)
    before = _files(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "train-000002.tar").unlink()
    (out / "manifest.json").unlink()

    report = shard_dataset(source, str(out), OPTIONS, progress=False)

    assert report.uploaded == ("train-000002.tar",)
    assert len(report.reused) == 4
    assert _files(out) == before
    for name, stamp in stamps.items():
        if name != "train-000002.tar":
            assert (out / name).stat().st_mtime_ns == stamp  # not rewritten


def test_interrupted_run_leaves_no_manifest_and_a_rerun_finishes(tmp_path, monkeypatch):
    source, out = _folder(tmp_path / "src"), tmp_path / "out"
    real_put, sent = storage.put_file, []

    def failing_put(local: Path, url: str, **kw) -> None:
        if len(sent) == 2:
            raise storage.StorageError("connection lost (simulated)")
        sent.append(url)
        real_put(local, url, **kw)

    monkeypatch.setattr(storage, "put_file", failing_put)
    with pytest.raises(storage.StorageError, match="simulated"):
        shard_dataset(source, str(out), OPTIONS, progress=False)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(".ldm-shard-*"))  # the scratch folder is cleaned up
    monkeypatch.setattr(storage, "put_file", real_put)

    report = shard_dataset(source, str(out), OPTIONS, progress=False)
    assert len(report.reused) == 2 and len(report.uploaded) == 3
    assert load_manifest(str(out)).counts == {"train": 72, "val": 18}


def test_existing_dataset_with_other_options_is_not_overwritten(tmp_path):
    source, out = _folder(tmp_path / "src", 30), str(tmp_path / "out")
    shard_dataset(source, out, OPTIONS, progress=False)
    with pytest.raises(ValueError, match="already holds a dataset .* delete .*manifest.json"):
        shard_dataset(source, out, OPTIONS.model_copy(update={"image_size": 8}), progress=False)
    again = shard_dataset(source, out, OPTIONS, progress=False)  # same job: a no-op re-check
    assert again.uploaded == ()


def test_a_changed_source_replaces_shards_after_removing_the_old_manifest(tmp_path, monkeypatch):
    source, out = _folder(tmp_path / "src", 30), tmp_path / "out"
    shard_dataset(source, str(out), OPTIONS, progress=False)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "src" / "class0" / "000.png")
    real_put = storage.put_file

    def put_checking_manifest(local: Path, url: str, **kw) -> None:
        assert not (out / "manifest.json").exists()  # never describes stale shards
        real_put(local, url, **kw)

    monkeypatch.setattr(storage, "put_file", put_checking_manifest)
    report = shard_dataset(source, str(out), OPTIONS, progress=False)
    assert report.uploaded and load_manifest(str(out)).fingerprint == report.manifest.fingerprint


def test_manifest_rejects_counts_that_do_not_add_up(tmp_path):
    shard_dataset(_folder(tmp_path / "src", 30), str(tmp_path / "out"), OPTIONS, progress=False)
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    data["counts"]["train"] += 1
    with pytest.raises(ValueError, match="manifest says 25 train samples but its train shards"):
        Manifest.model_validate(data)
    data["counts"]["train"] -= 1
    data["extra"] = 1
    with pytest.raises(ValueError, match="extra"):
        Manifest.model_validate(data)


def _ldm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_shards_mnist_and_prints_a_summary(tmp_path):
    result = _ldm("shard", "mnist", str(tmp_path), "--shard-max-samples", "2000", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "5,000 samples (4,500 train, 500 val) of 32×32×1 images" in result.stdout
    manifest = load_manifest(str(tmp_path))
    assert [s.name for s in manifest.shards] == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "val-000000.tar",
    ]
    assert manifest.class_names == tuple("0123456789")


def test_cli_errors_go_to_stderr_bad_options_with_exit_code_2_others_1(tmp_path):
    result = _ldm("shard", "mnist", str(tmp_path), "--val-fraction", "1.5")
    assert result.returncode == 2
    assert result.stderr == "ldm shard: error: --val-fraction: Input should be less than 1\n"
    env_result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "shard", "mnist", "s3://bucket/ds"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": "/usr/bin:/bin",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s",
            "AWS_MAX_ATTEMPTS": "1",
        },
    )
    assert env_result.returncode == 1
    assert "cannot reach the S3 endpoint http://127.0.0.1:9" in env_result.stderr


def test_output_inside_the_source_folder_is_refused(tmp_path):
    source = _folder(tmp_path / "src", 6)
    with pytest.raises(ValueError, match="is inside SOURCE"):
        shard_dataset(source, str(tmp_path / "src" / "shards"), OPTIONS, progress=False)


def test_existing_dataset_is_found_only_for_the_same_content_and_options(tmp_path):
    from data.shard import existing_dataset

    source = tmp_path / "digits.npz"
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (40, 16, 16), dtype=np.uint8)
    np.savez(source, images=images, labels=np.arange(40) % 4)
    options = ShardOptions(image_size=16, channels=1, shard_max_samples=16)
    out = str(tmp_path / "out")
    written = shard_dataset(str(source), out, options, progress=False).manifest
    assert existing_dataset(str(source), out, options) == written
    assert existing_dataset(str(source), out, options.model_copy(update={"seed": 1})) is None
    images[0, 0, 0] ^= 0xFF
    np.savez(source, images=images, labels=np.arange(40) % 4)
    assert existing_dataset(str(source), out, options) is None
    assert existing_dataset(str(source), str(tmp_path / "elsewhere"), options) is None
