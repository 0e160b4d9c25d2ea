"""Inputs that must not escape their checks: manifest entries used as paths, file
names that are not UTF-8, links, special files, huge or foreign images, URLs that
are almost right, datasets that cannot be evaluated."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import storage
from data.listing import open_listing
from data.manifest import ShardOptions, load_manifest
from data.reader import build_loader, iter_verified_samples
from data.shard import shard_dataset

OPTIONS = ShardOptions(image_size=8, channels=1, shard_max_samples=4, val_fraction=0.25)


def _images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((8, 8), i * 9, np.uint8), "L").save(folder / f"{i:03d}.png")


def _dataset(tmp_path: Path) -> Path:
    _images(tmp_path / "src" / "a", 8)
    _images(tmp_path / "src" / "b", 8)
    shard_dataset(str(tmp_path / "src"), str(tmp_path / "ds"), OPTIONS, progress=False)
    return tmp_path / "ds"


@pytest.mark.parametrize(
    "name",
    [
        "../outside/train-000000.tar",
        "/etc/train-000000.tar",
        "train-000000.tar/../x",
        "sub/train-000000.tar",
        "val-000000.tar",
        "train-0.tar",
        "manifest.json",
    ],
)
def test_a_manifest_entry_that_is_not_one_of_its_own_shards_is_refused_before_any_read(
    tmp_path, name
):
    dataset = _dataset(tmp_path)
    (tmp_path / "outside").mkdir()
    data = json.loads((dataset / "manifest.json").read_text())
    first = next(s for s in data["shards"] if s["split"] == "train")
    first["name"] = name
    (dataset / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="is not a shard of this dataset") as caught:
        load_manifest(str(dataset))
    assert repr(name) in str(caught.value)
    with pytest.raises(ValueError, match="is not a shard of this dataset"):
        build_loader(str(dataset), "train", 0, 1, 2, 0, 0, num_workers=0)


def test_the_shards_of_a_valid_manifest_are_read_from_its_own_folder(tmp_path):
    dataset = _dataset(tmp_path)
    manifest = load_manifest(str(dataset))
    samples = list(iter_verified_samples(str(dataset), manifest.split_shards("train")))
    assert len(samples) == manifest.counts["train"] == 12
    assert {Path(s["__url__"]).parent for s in samples} == {dataset}


def test_names_links_and_special_files_are_listed_as_skipped_not_crashed_on(tmp_path):
    src = tmp_path / "src"
    _images(src / "a", 3)
    _images(tmp_path / "elsewhere", 1)
    (src / "a" / os.fsdecode(b"caf\xe9.png")).write_bytes((src / "a" / "000.png").read_bytes())
    (src / "a" / "linked.png").symlink_to(tmp_path / "elsewhere" / "000.png")
    (src / "a" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (src / "a" / "folder-link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (src / "a" / "loop").symlink_to(src, target_is_directory=True)
    os.mkfifo(src / "a" / "pipe.png")
    report = shard_dataset(str(src), str(tmp_path / "ds"), OPTIONS, progress=False)
    skipped = {s.input: s.reason for s in report.manifest.skipped}
    assert skipped == {
        "a/caf\\xe9.png": "file name is not valid UTF-8: rename it to read it",
        "a/broken.png": "broken symbolic link",
        "a/folder-link/": "symbolic link to a folder (links to folders are not followed)",
        "a/loop/": "symbolic link to a folder (links to folders are not followed)",
        "a/pipe.png": "not a regular file",
    }
    assert sum(report.manifest.counts.values()) == 4  # three images and the linked file
    json.loads((tmp_path / "ds" / "manifest.json").read_text())  # valid UTF-8 JSON


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width×height pixels but carries (almost) no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))


def test_images_over_the_pixel_limit_are_skipped_from_their_header(tmp_path):
    src = tmp_path / "src"
    _images(src / "a", 4)
    (src / "a" / "huge.png").write_bytes(_png_header(10_000, 10_000))  # 100 MP < Pillow's 2×
    Image.new("L", (40, 30)).save(src / "a" / "big.png")
    options = OPTIONS.model_copy(update={"max_image_pixels": 1000})
    report = shard_dataset(str(src), str(tmp_path / "ds"), options, progress=False)
    skipped = {s.input: s.reason for s in report.manifest.skipped}
    assert skipped["a/huge.png"].startswith("too large: 10000×10000 = 100,000,000 pixels")
    assert skipped["a/big.png"].startswith("too large: 40×30 = 1,200 pixels, over the limit")
    default = shard_dataset(str(src), str(tmp_path / "ds2"), OPTIONS, progress=False)
    assert {s.input for s in default.manifest.skipped} == {"a/huge.png"}  # Pillow's limit


def test_only_image_formats_are_opened_whatever_the_file_is_called(tmp_path):
    src = tmp_path / "src"
    _images(src / "a", 4)
    Image.new("L", (8, 8), 5).save(src / "a" / "tiff-in-disguise.png", format="TIFF")
    Image.new("L", (8, 8), 5).save(src / "a" / "really.jpg", format="JPEG")
    report = shard_dataset(str(src), str(tmp_path / "ds"), OPTIONS, progress=False)
    skipped = {s.input: s.reason for s in report.manifest.skipped}
    assert list(skipped) == ["a/tiff-in-disguise.png"]
    assert "only PNG, JPEG, WebP, BMP and GIF files are read" in skipped["a/tiff-in-disguise.png"]


@pytest.mark.parametrize(
    ("url", "meant"),
    [
        ("s3:/bucket/data", "did you mean 's3://bucket/data'"),
        ("s3:bucket", "did you mean 's3://bucket'"),
        ("S3://bucket/x", "did you mean 's3://bucket/x'"),
        ("s3a://bucket/x", "did you mean 's3://bucket/x'"),
        ("file:/tmp/data", "did you mean 'file:///tmp/data'"),
        ("gs://bucket/x", "use a local path, file:///absolute/path or s3://bucket/prefix"),
        ("https://host/data", "use a local path, file:///absolute/path or s3://bucket/prefix"),
    ],
)
def test_an_almost_right_url_says_what_was_meant_and_never_becomes_a_folder(
    url, meant, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="did you mean|use a local path") as caught:
        storage.parse(url)
    assert meant in str(caught.value)
    with pytest.raises(ValueError, match="did you mean|use a local path"):
        shard_dataset("mnist", url, OPTIONS, progress=False)
    assert not any(tmp_path.iterdir())  # nothing was created under a look-alike name


def test_plain_paths_with_colons_stay_paths(tmp_path):
    assert storage.parse("runs:2026/data").path == Path("runs:2026/data")
    assert storage.parse(str(tmp_path / "a:b")).path == tmp_path / "a:b"


def test_a_source_listing_never_escapes_into_symlinked_folders(tmp_path):
    src = tmp_path / "src"
    _images(src, 2)
    _images(tmp_path / "secret", 3)
    (src / "peek").symlink_to(tmp_path / "secret", target_is_directory=True)
    listed = open_listing(str(src), tmp_path)
    assert [i.ref for i in listed.inputs_at(range(listed.count))] == ["000.png", "001.png"]
