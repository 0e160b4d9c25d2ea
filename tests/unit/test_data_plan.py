"""The shard plan: a seeded permutation evaluated per slot, a listing that numbers
inputs in name order from disk, shards fixed by their slots, and engines that hand
results back in plan order."""

from __future__ import annotations

import io
import random
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.listing import FolderListing
from data.manifest import ShardOptions
from data.permutation import SeededPermutation
from data.shard import plan_shards, shard_dataset
from data.shard_engines import _in_order

OPTIONS = ShardOptions(image_size=8, channels=1, shard_max_samples=4, val_fraction=0.25)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 64, 1000, 4097])
def test_the_permutation_is_a_bijection_fixed_by_n_and_seed(n):
    image = SeededPermutation(n, seed=3)(range(n))
    assert sorted(image.tolist()) == list(range(n))
    assert np.array_equal(image, SeededPermutation(n, seed=3)(range(n)))
    if n >= 64:
        assert not np.array_equal(image, SeededPermutation(n, seed=4)(range(n)))
        # evaluated a few positions at a time, it gives the same values
        assert SeededPermutation(n, 3)([n - 1, 0, n // 2]).tolist() == [
            image[n - 1],
            image[0],
            image[n // 2],
        ]


def test_the_permutation_has_no_visible_order():
    n = 100_000
    image = SeededPermutation(n, seed=0)(range(n)).astype(float)
    assert abs(np.corrcoef(np.arange(n), image)[0, 1]) < 0.02
    assert abs(np.corrcoef(image[:-1], image[1:])[0, 1]) < 0.02
    # each tenth of the slots draws evenly from each tenth of the inputs
    counts = np.histogram2d(np.arange(n) // 10_000, image // 10_000, bins=10)[0]
    assert counts.min() > 850 and counts.max() < 1150


def test_positions_outside_the_permutation_are_refused():
    with pytest.raises(IndexError, match="0 … 9"):
        SeededPermutation(10, 0)([10])


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_folder_listing_numbers_inputs_in_name_order_from_disk(tmp_path):
    names = ["b/2.png", "a/10.png", "a/9.png", "b/é.png", "b/z/1.png", "a.png", ".hid/x.png"]
    for name in random.Random(0).sample(names, len(names)):
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(_png(1))
    (tmp_path / "src" / "c").mkdir()
    (tmp_path / "scratch").mkdir()
    listing = FolderListing(str(tmp_path / "src"), tmp_path / "scratch")

    assert listing.class_names == ("a", "b", "c")
    inputs = listing.inputs_at(range(listing.count))
    assert [(i.ref, i.label) for i in inputs] == [
        ("a/10.png", 0),
        ("a/9.png", 0),
        ("b/2.png", 1),
        ("b/z/1.png", 1),
        ("b/é.png", 1),
    ]
    assert [i.ref for i in listing.inputs_at([4, 0, 2])] == ["b/é.png", "a/10.png", "b/2.png"]
    assert {s.ref: s.reason for s in listing.skipped()} == {
        ".hid/x.png": "hidden file or folder",
        "a.png": "outside any class folder",
        "c/": "class folder holds no images",
    }
    assert (tmp_path / "scratch" / "listing.sqlite").exists()
    listing.close()


def _keys(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return sorted({m.name.split(".")[0] for m in tar.getmembers()})


def test_a_skipped_input_leaves_its_slot_empty_and_no_other_shard_changes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"{i:02d}.png").write_bytes(_png(i))
    before = shard_dataset(str(src), str(tmp_path / "a"), OPTIONS, progress=False).manifest
    (tmp_path / "scratch").mkdir()
    listing = FolderListing(str(src), tmp_path / "scratch")
    first = next(plan_shards(listing, OPTIONS))
    listing.close()
    (src / first.inputs[1].ref).write_bytes(b"broken")  # the 2nd input of train shard 0

    after = shard_dataset(str(src), str(tmp_path / "b"), OPTIONS, progress=False).manifest
    assert [s.num_samples for s in after.shards] == [3] + [s.num_samples for s in before.shards[1:]]
    assert after.shards[1:] == before.shards[1:]  # same bytes, same checksums
    assert _keys(tmp_path / "b" / "train-000000.tar") == ["000000000", "000000002", "000000003"]
    assert [s.input for s in after.skipped] == [first.inputs[1].ref]


def test_results_come_back_in_plan_order_with_a_bounded_number_running():
    running, most = set(), 0
    lock = threading.Lock()
    rng = random.Random(0)

    def work(i: int) -> int:
        nonlocal most
        with lock:
            running.add(i)
            most = max(most, len(running))
        time.sleep(rng.random() / 200)
        with lock:
            running.discard(i)
        return i

    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    with ThreadPoolExecutor(8) as pool:
        results = list(
            _in_order(
                iter(range(60)),
                submit=lambda i: pool.submit(work, i),
                wait_any=lambda fs: wait(fs, return_when=FIRST_COMPLETED)[0],
                result=lambda f: f.result(),
                width=3,
            )
        )
    assert results == list(range(60))
    assert most <= 3
