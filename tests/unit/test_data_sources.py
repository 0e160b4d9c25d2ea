"""Sources and bad input: every input becomes a sample or a listed skip with a reason."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.convert import BadInput, decode, prepare
from data.listing import open_listing
from data.manifest import ShardOptions, load_manifest
from data.shard import shard_dataset

OPTIONS = ShardOptions(image_size=16, channels=3, shard_max_samples=8, val_fraction=0.0)


def _listed(spec: str, scratch: Path):
    """The listing of ``spec`` and all its inputs in position order."""
    scratch.mkdir(exist_ok=True)
    listing = open_listing(spec, scratch)
    return listing, listing.inputs_at(range(listing.count))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _save(path: Path, image: Image.Image, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)


def _messy_folder(root: Path) -> None:
    """Two usable classes full of awkward files, and one empty class."""
    rgb = Image.new("RGB", (16, 16), (10, 200, 30))
    _save(root / "cat/rgb.png", rgb)
    _save(root / "cat/wide.jpg", Image.new("RGB", (40, 24), (200, 10, 10)))
    _save(root / "cat/cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 0, 0)))
    _save(root / "cat/gray16.png", Image.fromarray(np.full((16, 16), 0x8080, np.uint16)))
    _save(root / "cat/rgba.png", Image.new("RGBA", (16, 16), (255, 0, 0, 128)))
    _save(root / "dog/palette.gif", Image.new("P", (16, 16), 3), transparency=3)
    _save(root / "dog/pic.webp", rgb, lossless=True)
    _save(root / "dog/pic.bmp", rgb)
    _save(root / "dog/nested/deeper.png", rgb)
    (root / "dog/truncated.png").write_bytes(_png(rgb)[:40])
    (root / "dog/zero.png").write_bytes(b"")
    (root / "dog/fake.png").write_text("this is not an image")
    (root / "dog/readme.txt").write_text("notes")
    (root / "dog/.DS_Store").write_bytes(b"\0")
    (root / "stray.png").write_bytes(_png(rgb))
    (root / "empty").mkdir()


EXPECTED_SKIPS = {
    "dog/.DS_Store": "hidden file",
    "dog/truncated.png": "not a decodable image",
    "dog/zero.png": "empty file (0 bytes)",
    "dog/fake.png": "not a decodable image (UnidentifiedImageError",
    "dog/readme.txt": "not an image file name",
    "stray.png": "outside any class folder",
    "empty/": "class folder holds no images",
}


def test_folder_with_bad_files_converts_what_it_can_and_lists_the_rest(tmp_path):
    _messy_folder(tmp_path / "src")
    source, inputs = _listed(str(tmp_path / "src"), tmp_path / "scratch")
    assert source.class_names == ("cat", "dog", "empty")
    assert {i.ref: i.label for i in inputs}["dog/nested/deeper.png"] == 1

    shard_dataset(str(tmp_path / "src"), str(tmp_path / "out"), OPTIONS, progress=False)

    manifest = load_manifest(str(tmp_path / "out"))
    skipped = {s.input: s.reason for s in manifest.skipped}
    assert skipped.keys() == EXPECTED_SKIPS.keys()
    for name, reason in EXPECTED_SKIPS.items():
        assert reason in skipped[name], (name, skipped[name])
    assert manifest.counts == {"train": 9, "val": 0}  # 5 cat + 4 dog images made it
    written = _samples(tmp_path / "out")
    assert sorted(written) == sorted(
        ["cat/rgb.png", "cat/wide.jpg", "cat/cmyk.jpg", "cat/gray16.png", "cat/rgba.png"]
        + ["dog/palette.gif", "dog/pic.webp", "dog/pic.bmp", "dog/nested/deeper.png"]
    )
    assert written["cat/gray16.png"][1] == 0 and written["dog/pic.bmp"][1] == 1
    assert all(pixels.shape == (16, 16, 3) for pixels, _ in written.values())
    assert tuple(written["cat/rgba.png"][0][0, 0]) == (128, 0, 0)  # alpha over black
    assert tuple(written["cat/gray16.png"][0][0, 0]) == (128, 128, 128)  # 0x8080 / 257


def _samples(folder: Path) -> dict[str, tuple[np.ndarray, int]]:
    """Every sample of every shard: source path → (uint8 pixels [H, W, C], class id)."""
    found: dict[str, tuple[np.ndarray, int]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in files if n.endswith(".json")):
            key = name[: -len(".json")]
            pixels = np.asarray(Image.open(io.BytesIO(files[key + ".png"])))
            meta = json.loads(files[name])
            ref = meta.get("path", meta.get("index"))
            found[ref] = (pixels.reshape(*pixels.shape[:2], -1), int(files[key + ".cls"]))
    return found


def test_unconditional_folder_has_no_class_names_and_label_zero(tmp_path):
    for i in range(3):
        _save(tmp_path / f"img{i}.png", Image.new("L", (16, 16), i * 50))
    source, inputs = _listed(str(tmp_path), tmp_path.parent / f"{tmp_path.name}-scratch")
    assert source.class_names == ()
    assert [(i.ref, i.label) for i in inputs] == [
        ("img0.png", 0),
        ("img1.png", 0),
        ("img2.png", 0),
    ]


def test_conversion_rules():
    wide = Image.new("RGB", (40, 24), (0, 0, 0))
    wide.paste((255, 255, 255), (18, 0, 22, 24))  # a white bar in the middle
    pixels = prepare(wide, 16, 1)
    assert pixels.shape == (16, 16, 1)  # shorter side → 16, then centre crop
    assert pixels[8, 8, 0] > 200 and pixels[8, 0, 0] < 20
    luma = prepare(Image.new("RGB", (16, 16), (255, 0, 0)), 16, 1)
    assert int(luma[0, 0, 0]) == 76  # ITU-R 601: 0.299 · 255
    gray_to_rgb = prepare(Image.new("L", (16, 16), 90), 16, 3)
    assert tuple(gray_to_rgb[0, 0]) == (90, 90, 90)
    frames = [Image.new("L", (16, 16), v) for v in (10, 240)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert int(prepare(decode(buffer.getvalue()), 16, 1)[0, 0, 0]) == 10  # the first frame
    with pytest.raises(BadInput, match="empty file"):
        decode(b"")


def _npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_npz_labels_out_of_range_are_skipped_and_listed(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 5, -1, 1])
    names = np.array(["a", "b", "c"])
    npz = _npz(tmp_path / "d.npz", images=images, labels=labels, class_names=names)
    source, inputs = _listed(npz, tmp_path)
    assert source.class_names == ("a", "b", "c")
    assert [i.ref for i in inputs] == ["0", "1", "2", "5"]
    assert [(s.ref, s.reason) for s in source.skipped()] == [
        ("3", "label 5 outside 0 … 2"),
        ("4", "label -1 outside 0 … 2"),
    ]
    without_names, inputs = _listed(
        _npz(tmp_path / "e.npz", images=images, labels=labels), tmp_path
    )
    assert without_names.class_names == tuple("012345") and len(inputs) == 5


def test_npz_without_labels_is_unconditional_and_grayscale_arrays_work(tmp_path):
    images = np.zeros((4, 20, 20), np.uint8)
    source, inputs = _listed(_npz(tmp_path / "g.npz", images=images), tmp_path)
    assert source.class_names == () and {i.label for i in inputs} == {0}
    assert source.pixels_at([0]).shape == (1, 20, 20)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"pixels": np.zeros((2, 8, 8), np.uint8)}, "has no 'images' array"),
        ({"images": np.zeros((2, 8, 8), np.float32)}, "'images' must be uint8"),
        ({"images": np.zeros((2, 8, 8, 2), np.uint8)}, r"\[N,H,W,C\] with C in 1, 3, 4"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.zeros(3)}, "shape \\(2,\\)"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.array([0.5, 1])}, "integers"),
    ],
)
def test_npz_that_cannot_be_read_says_what_to_fix(tmp_path, arrays, message):
    with pytest.raises(ValueError, match=message):
        open_listing(_npz(tmp_path / "bad.npz", **arrays), tmp_path)


def test_empty_or_missing_source_is_a_clear_error_and_writes_nothing(tmp_path):
    (tmp_path / "src" / "only_class").mkdir(parents=True)
    (tmp_path / "src" / "only_class" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no usable images"):
        shard_dataset(str(tmp_path / "src"), str(tmp_path / "out"), OPTIONS, progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "zero.png").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the inputs .* zero.png: empty file"):
        shard_dataset(str(tmp_path / "bad"), str(tmp_path / "out2"), OPTIONS, progress=False)
    with pytest.raises(ValueError, match="is not 'mnist', an existing .npz file"):
        shard_dataset(str(tmp_path / "nothing"), str(tmp_path / "out3"), OPTIONS, progress=False)
    assert not any((tmp_path / name / "manifest.json").exists() for name in ("out", "out2"))
    assert not (tmp_path / "out3").exists()
