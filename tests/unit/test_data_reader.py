"""The reader: disjoint shards per rank, equal batch counts, reproducible order, checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data import build_loader
from data.manifest import ShardOptions, load_manifest
from data.reader import assign_shards
from data.shard import shard_dataset
from data.storage import StorageError

# 110 samples in shards of 20: five full shards and one of 10 (uneven on purpose).
COUNT = 110
OPTIONS = ShardOptions(image_size=16, channels=1, shard_max_samples=20, val_fraction=0.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[bytes, int]]:
    """A sharded dataset, and its source as {uint8 pixel bytes: label}."""
    root = tmp_path_factory.mktemp("reader")
    images = np.random.default_rng(0).integers(0, 256, (COUNT, 16, 16), dtype=np.uint8)
    labels = np.arange(COUNT) % 7
    np.savez(root / "src.npz", images=images, labels=labels)
    shard_dataset(str(root / "src.npz"), str(root / "ds"), OPTIONS, progress=False)
    return root / "ds", {im.tobytes(): int(y) for im, y in zip(images, labels, strict=True)}


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for path in folder.iterdir():
        (to / path.name).write_bytes(path.read_bytes())
    return to


def _identities(batches) -> list[tuple[bytes, int]]:
    """Each sample as (its uint8 pixel bytes, label), checking dtypes and value range."""
    out = []
    for images, labels in batches:
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.shape[1:] == (1, 16, 16) and images.min() >= -1 and images.max() <= 1
        pixels = ((images + 1) * 127.5).round().to(torch.uint8)[:, 0]
        out += [(p.numpy().tobytes(), int(y)) for p, y in zip(pixels, labels, strict=True)]
    return out


def test_shard_sizes_are_uneven(dataset):
    sizes = [s.num_samples for s in load_manifest(str(dataset[0])).shards]
    assert sorted(sizes) == [10, 20, 20, 20, 20, 20]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_shards_and_the_same_number_of_batches(dataset, world_size):
    folder, source = dataset
    batch_size, seen, shards, produced = 8, [], [], []
    for rank in range(world_size):
        loader = build_loader(
            str(folder), "train", rank, world_size, batch_size, 5, 0, num_workers=0
        )
        batches = list(loader)
        produced.append((len(loader), len(batches)))
        assert all(len(y) == batch_size for _, y in batches)
        shards.append(set(loader.shard_names))
        seen += _identities(batches)
    totals = [
        sum(s.num_samples for s in rank)
        for rank in assign_shards(load_manifest(str(folder)).shards, world_size, 5, 0)
    ]
    expected = min(totals) // batch_size
    assert produced == [(expected, expected)] * world_size
    assert set.union(*shards) == {s.name for s in load_manifest(str(folder)).shards}
    assert sum(len(s) for s in shards) == 6  # disjoint
    assert len(set(seen)) == len(seen)  # no sample twice
    assert all(source[pixels] == label for pixels, label in seen)  # and all from the source


def test_assignment_is_balanced_and_changes_with_the_epoch(dataset):
    shards = load_manifest(str(dataset[0])).shards
    first = assign_shards(shards, 3, seed=0, epoch=0)
    assert sorted(sum(s.num_samples for s in rank) for rank in first) == [30, 40, 40]
    assert assign_shards(shards, 3, seed=0, epoch=0) == first
    assert any(assign_shards(shards, 3, seed=0, epoch=e) != first for e in range(1, 5))


def test_one_rank_reads_every_sample_once_with_or_without_workers(dataset):
    folder, source = dataset
    single = _identities(build_loader(str(folder), "train", 0, 1, 10, 0, 0, num_workers=0))
    workers = build_loader(str(folder), "train", 0, 1, 10, 0, 0, num_workers=2)
    assert workers.num_workers == 2
    assert sorted(single) == sorted(_identities(workers)) == sorted(source.items())


def test_order_is_reproducible_from_seed_and_epoch(dataset):
    folder = str(dataset[0])

    def order(seed: int, epoch: int) -> list[tuple[bytes, int]]:
        return _identities(build_loader(folder, "train", 0, 1, 10, seed, epoch, num_workers=0))

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    unshuffled = build_loader(folder, "train", 0, 1, 10, 0, 0, num_workers=0, shuffle_buffer=0)
    assert _identities(unshuffled) != order(0, 0)


@pytest.mark.parametrize(("rank", "world_size", "workers"), [(0, 1, 0), (0, 1, 2), (1, 2, 1)])
def test_a_split_kept_in_memory_gives_the_streamed_batches_in_order(
    dataset, rank, world_size, workers
):
    """Within the memory budget the split is decoded once and every epoch's batches are
    those streaming the shards gives, in the same order, whatever the workers."""
    folder = str(dataset[0])
    for epoch in (0, 1):
        args = (folder, "train", rank, world_size, 8, 4, epoch)
        streamed = build_loader(*args, num_workers=workers)
        kept = build_loader(*args, num_workers=workers, memory_budget=1 << 20)
        assert streamed.decoded is None and kept.decoded is not None
        pairs = list(zip(streamed, kept, strict=True))
        assert len(pairs) == len(streamed)
        for (x, y), (x_kept, y_kept) in pairs:
            assert torch.equal(x, x_kept) and torch.equal(y, y_kept)


def test_a_split_over_the_memory_budget_is_streamed(dataset):
    loader = build_loader(str(dataset[0]), "train", 0, 1, 8, 0, 0, memory_budget=COUNT * 255)
    assert loader.decoded is None  # 110 images of 16×16 bytes do not fit
    assert len(list(loader)) == len(loader)


def test_a_shard_that_fails_its_checksum_is_reported(dataset, tmp_path):
    folder = _copy(dataset[0], tmp_path / "ds")
    shard = folder / "train-000003.tar"
    data = bytearray(shard.read_bytes())
    data[512 + 100] ^= 0xFF  # tar padding after the first member: still a valid tar
    shard.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="train-000003.tar does not match the manifest"):
        list(build_loader(str(folder), "train", 0, 1, 10, 0, 0, num_workers=0))
    with pytest.raises(StorageError, match="train-000003.tar does not match the manifest"):
        build_loader(str(folder), "train", 0, 1, 10, 0, 0, memory_budget=1 << 20)  # decoding


def test_a_damaged_image_names_its_shard(dataset, tmp_path):
    folder = _copy(dataset[0], tmp_path / "ds")
    shard = folder / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    offset = data.index(b"\x89PNG")  # the first PNG's signature
    data[offset : offset + 4] = b"JUNK"
    shard.write_bytes(bytes(data))
    loader = build_loader(str(folder), "train", 0, 1, 10, 0, 0, num_workers=0, shuffle_buffer=0)
    with pytest.raises(StorageError, match="of .*train-000001.tar cannot be decoded"):
        list(loader)  # decoded before the end of the shard, where its checksum is checked


def test_missing_or_truncated_shards_fail_before_reading(dataset, tmp_path):
    folder = _copy(dataset[0], tmp_path / "ds")
    (folder / "train-000004.tar").unlink()
    with pytest.raises(
        StorageError, match="train-000004.tar is listed in the manifest but missing"
    ):
        build_loader(str(folder), "train", 0, 1, 10, 0, 0)
    with pytest.raises(  # the same before a split is decoded into memory
        StorageError, match="train-000004.tar is listed in the manifest but missing"
    ):
        build_loader(str(folder), "train", 0, 1, 10, 0, 0, memory_budget=1 << 20)
    shard = folder / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:1024])
    with pytest.raises(StorageError, match="train-000002.tar has 1024 bytes but the manifest"):
        build_loader(str(folder), "train", 0, 2, 10, 0, 0)


def test_no_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest at .*run 'ldm shard'"):
        build_loader(str(tmp_path), "train", 0, 1, 10, 0, 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("train", 0, 7, 4), "has 6 shards, fewer than the 7 ranks reading it"),
        (("val", 0, 1, 4), "has 0 shards"),
        (("train", 0, 2, 60), "fewer than batch_size=60"),
        (("train", 2, 2, 4), "need 0 <= rank < world_size"),
        (("test", 0, 1, 4), "split must be one of"),
    ],
)
def test_impossible_requests_say_what_to_change(dataset, args, message):
    split, rank, world_size, batch_size = args
    with pytest.raises(ValueError, match=message):
        build_loader(str(dataset[0]), split, rank, world_size, batch_size, 0, 0)


def test_resampled_shards_feed_more_ranks_than_there_are_shards(dataset):
    folder, source = dataset
    world_size, batch_size = 8, 4  # 6 shards: partitioned reading refuses 8 ranks
    with pytest.raises(ValueError, match="shard_sampling: resampled"):
        build_loader(str(folder), "train", 0, world_size, batch_size, 0, 0, num_workers=0)
    per_rank = []
    for rank in range(world_size):
        loader = build_loader(
            str(folder),
            "train",
            rank,
            world_size,
            batch_size,
            0,
            0,
            num_workers=0,
            sampling="resampled",
        )
        assert len(loader) == COUNT // world_size // batch_size == 3
        seen = _identities(loader)
        assert len(seen) == 3 * batch_size and all(source[p] == y for p, y in seen)
        per_rank.append(loader.shard_names)
    assert len({tuple(names) for names in per_rank}) > 1  # ranks draw differently
    again = build_loader(
        str(folder), "train", 3, world_size, batch_size, 0, 0, num_workers=0, sampling="resampled"
    )
    assert again.shard_names == per_rank[3]  # the same seed, epoch and rank: the same draw


def test_resampled_reading_draws_every_shard_over_epochs_and_new_ones_when_the_data_grows(
    dataset, tmp_path
):
    import json

    folder = _copy(dataset[0], tmp_path / "ds")
    names = load_manifest(str(folder)).split_shards("train")
    drawn = set()
    for epoch in range(12):
        loader = build_loader(
            str(folder), "train", 0, 2, 8, 0, epoch, num_workers=0, sampling="resampled"
        )
        drawn |= set(loader.shard_names)
    assert drawn == {s.name for s in names}
    # the dataset grows between epochs: a copy of a shard is published as a new one
    manifest = json.loads((folder / "manifest.json").read_text())
    extra = dict(manifest["shards"][0], name="train-000099.tar")
    (folder / "train-000099.tar").write_bytes(
        (folder / extra["name"].replace("99", "00")).read_bytes()
    )
    manifest["shards"].append(extra)
    manifest["counts"]["train"] += extra["num_samples"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    later = set()
    for epoch in range(12, 30):
        loader = build_loader(
            str(folder), "train", 0, 2, 8, 0, epoch, num_workers=0, sampling="resampled"
        )
        later |= set(loader.shard_names)
        list(loader)  # every drawn shard reads and checks
    assert "train-000099.tar" in later
