"""The reader: a manifest → batches ``(images float32 [B, C, H, W] in [-1, 1], labels int64 [B])``
for one rank of a distributed job.

Guarantees (all computed from the manifest, so ranks need not talk to each other):

- the ranks read disjoint sets of whole shards, re-dealt every epoch from ``seed`` and
  ``epoch`` (largest shards first to the rank holding the fewest samples), or, with
  ``sampling="resampled"``, shards each rank draws with replacement (``data.dealing``);
- every rank yields exactly ``len(loader)`` full batches per epoch: the smallest rank's
  sample count // batch_size. Ranks holding more stop early, so distributed training
  never waits on an exhausted rank;
- before any reading, every shard of the rank must exist with the size the manifest
  lists; each shard read to its end must match its sha256 and sample count (a rank
  that holds more samples than it yields stops early and leaves the rest of a shard
  unchecked that epoch); a sample that cannot be decoded fails at once, naming its shard;
- ``s3://`` shards stream through boto3 (webdataset's ``gopen`` with an ``s3`` scheme
  registered by :func:`register_s3_opener`);
- with a ``memory_budget`` that the whole split's decoded samples fit in, the split is
  read, verified and decoded once per process and later epochs are served from memory:
  the same batches in the same order as streaming them, without the per-sample cost of
  reading (which, on a CPU training node, competes with the training step).
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data import manifest as manifests
from data import storage
from data.convert import decode_png
from data.dealing import ShardSampling, assign_shards, draw_shards
from data.manifest import SPLITS, Manifest, ShardEntry, Split, load_manifest

Batch = tuple[Tensor, Tensor]


def build_loader(
    dataset_url: str,
    split: Split,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    memory_budget: int = 0,
    sampling: ShardSampling = "partitioned",
) -> ShardLoader:
    """Exactly ``len(loader)`` batches ``(images float32 [B, C, H, W] in [-1, 1], labels
    int64 [B])`` of one split for ``rank`` of ``world_size`` in ``epoch``; B = batch_size,
    and every rank gets the same number of batches.

    ``dataset_url``: the dataset folder / ``s3://`` prefix or its ``manifest.json``.
    ``num_workers``: DataLoader worker processes (0 reads in this process; never more
    than this rank's shards). ``shuffle_buffer``: samples each worker shuffles among
    (1 or 0: no shuffling). The order is reproducible from ``seed``, ``epoch`` and
    ``num_workers``. ``memory_budget``: bytes of decoded samples this process may keep;
    when the whole split fits, it is decoded once and served from memory (0: stream
    every epoch from the shards). ``sampling``: how ranks get shards (``data.dealing``:
    each shard once per epoch, or drawn with replacement). Raises ValueError when the
    split cannot feed every rank at least one batch, :class:`storage.StorageError` when
    a shard is missing or damaged.
    """
    _check_arguments(split, rank, world_size, batch_size, num_workers)
    url = manifest_url_of(dataset_url)
    manifest = load_manifest(url)
    deal = (seed, epoch, rank)
    mine, num_batches = rank_shards(manifest, split, world_size, batch_size, deal, sampling)
    folder = url.rsplit("/", 1)[0] if "/" in url else "."
    dataset = _RankShards(folder, mine, manifest, batch_size, shuffle_buffer, deal)
    decoded = _decoded_split(folder, manifest, split, memory_budget)
    if decoded is None:
        check_shards_exist(folder, list({s.name: s for s in mine}.values()))
    workers = min(num_workers, len(mine))
    return ShardLoader(manifest, dataset, num_batches, batch_size, workers, decoded)


def rank_shards(
    manifest: Manifest,
    split: Split,
    world_size: int,
    batch_size: int,
    deal: tuple[int, int, int],
    sampling: ShardSampling,
) -> tuple[list[ShardEntry], int]:
    """The shards a rank of ``world_size`` reads and the batches every rank yields, for
    ``deal`` = (seed, epoch, rank) and ``sampling``. Raises ValueError, saying what to
    change, when the split cannot give every rank its own shards or a full batch."""
    seed, epoch, rank = deal
    shards = manifest.split_shards(split)
    if sampling == "resampled":  # this rank's share of the split, drawn with replacement
        num_batches = manifest.counts.get(split, 0) // world_size // batch_size
        mine = draw_shards(shards, num_batches * batch_size, seed, epoch, rank) if shards else []
    else:
        if len(shards) < world_size:
            raise ValueError(
                f"the {split} split has {len(shards)} shards, fewer than the {world_size} "
                "ranks reading it: every rank needs its own shards; re-shard with fewer "
                "samples a shard ('ldm shard --shard-max-samples', shard.shard_max_samples "
                "of 'ldm retrain'), train on fewer workers, or draw shards with replacement "
                "(shard_sampling: resampled)"
            )
        per_rank = assign_shards(shards, world_size, seed, epoch)
        num_batches = min(sum(s.num_samples for s in r) for r in per_rank) // batch_size
        mine = list(per_rank[rank])
    if num_batches == 0:
        raise ValueError(
            f"a rank gets fewer than batch_size={batch_size} {split} samples "
            f"({manifest.counts.get(split, 0)} over {world_size} ranks): lower batch_size"
        )
    return mine, num_batches


def manifest_url_of(url: str) -> str:
    """The ``manifest.json`` URL for a dataset folder, prefix or manifest URL."""
    return manifests.manifest_url(url.rstrip("/"))


def check_shards_exist(folder: str, shards: Sequence[ShardEntry]) -> None:
    """Every shard must exist with the size the manifest lists (checked in parallel)."""

    def check(entry: ShardEntry) -> None:
        url = storage.join(folder, entry.name)
        found = storage.stat(url)
        if found is None:
            raise storage.StorageError(
                f"shard {url} is listed in the manifest but missing; re-run 'ldm shard' "
                "to restore it"
            )
        if found[0] != entry.num_bytes:
            raise storage.StorageError(
                f"shard {url} has {found[0]} bytes but the manifest lists {entry.num_bytes}; "
                "it is damaged or from another run: re-run 'ldm shard'"
            )

    with ThreadPoolExecutor(min(16, max(1, len(shards)))) as pool:
        list(pool.map(check, shards))


def register_s3_opener() -> None:
    """Let webdataset's ``gopen`` open ``s3://`` URLs through boto3 (idempotent)."""
    import webdataset as wds

    wds.gopen_schemes["s3"] = _gopen_s3


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: object) -> IO[bytes]:
    if mode != "rb":
        raise ValueError(f"s3:// shards are read-only here ({url}); write them with 'ldm shard'")
    return storage.open_stream(url)


class ShardLoader:
    """Iterable of exactly ``len(self)`` batches ``(images float32 [B, C, H, W] in
    [-1, 1], labels int64 [B])``; iterate once per epoch."""

    def __init__(
        self,
        manifest: Manifest,
        dataset: _RankShards,
        num_batches: int,
        batch_size: int,
        num_workers: int,
        decoded: DecodedSplit | None = None,
    ) -> None:
        self.manifest = manifest
        self.dataset = dataset
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.decoded = decoded  # the split in memory, else None: streamed from the shards

    @property
    def shard_names(self) -> list[str]:
        """The shards this rank reads this epoch."""
        return [s.name for s in self.dataset.shards]

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        if self.decoded is not None:
            worker_batches = self.dataset.from_memory(self.decoded, max(1, self.num_workers))
        else:
            worker_batches = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers)
        batches = _rebatch(worker_batches, self.batch_size)
        produced = 0
        for batch in batches:
            yield batch
            produced += 1
            if produced == self.num_batches:
                if self.num_batches * self.batch_size == self.dataset.num_samples:
                    for _ in batches:  # nothing is left but the end-of-shard checks
                        pass
                return
        raise RuntimeError(
            f"read only {produced} of {self.num_batches} batches: the shards hold fewer "
            "samples than the manifest says"
        )


class _RankShards(IterableDataset):
    """One rank's shards as worker-sized batches; each DataLoader worker reads every
    ``num_workers``-th shard. Stages, per worker:"""

    def __init__(
        self,
        folder: str,
        shards: list[ShardEntry],
        manifest: Manifest,
        batch_size: int,
        shuffle_buffer: int,
        seed_parts: tuple[int, int, int],
    ) -> None:
        super().__init__()
        self.folder, self.shards, self.batch_size = folder, shards, batch_size
        self.kind = manifest.kind
        size, channels = manifest.image_size, manifest.channels
        self.shape = (size, size, channels) if self.kind == "images" else (channels, size, size)
        self.shuffle_buffer, self.seed_parts = shuffle_buffer, seed_parts
        self.num_samples = sum(s.num_samples for s in shards)

    def __iter__(self) -> Iterator[Batch]:
        import webdataset as wds

        register_s3_opener()  # each worker process needs it (spawned workers start bare)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        samples = iter_verified_samples(self.folder, self.shards[worker::workers])
        # → dicts {__key__, png | npy, cls, json} in shard order, each checked at its end
        if self.shuffle_buffer > 1:
            rng = random.Random("samples/{}/{}/{}/".format(*self.seed_parts) + str(worker))
            samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
        # → the same dicts, shuffled within a buffer of shuffle_buffer samples
        pairs = (self._decode(s) for s in samples)
        # → (uint8 [H, W, C] image or float32 [C, H, W] latent, class id)
        yield from wds.batched(self.batch_size, collation_fn=_collate, partial=True)(pairs)
        # → (float32 [b, C, H, W] (pixels in [-1, 1]), int64 [b]), b ≤ batch_size

    def from_memory(self, decoded: DecodedSplit, workers: int) -> Iterator[Batch]:
        """The batches a DataLoader of ``workers`` workers gives over :meth:`__iter__`,
        from decoded samples: each worker's shuffle runs over sample positions instead of
        samples (the same rng, the same buffer, so the same permutation), and the
        workers' batches are taken in turn, an exhausted worker skipped, as the
        DataLoader takes them."""
        streams = [self._position_batches(worker, workers) for worker in range(workers)]
        while streams:
            for stream in list(streams):
                positions = next(stream, None)
                if positions is None:
                    streams.remove(stream)
                else:
                    yield decoded.batch(positions)

    def _position_batches(self, worker: int, workers: int) -> Iterator[list[tuple[str, int]]]:
        import webdataset as wds

        positions: Iterator[tuple[str, int]] = (
            (shard.name, index)
            for shard in self.shards[worker::workers]
            for index in range(shard.num_samples)
        )
        if self.shuffle_buffer > 1:
            rng = random.Random("samples/{}/{}/{}/".format(*self.seed_parts) + str(worker))
            positions = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(positions)
        yield from wds.batched(self.batch_size, collation_fn=None, partial=True)(positions)

    def _decode(self, sample: dict) -> tuple[np.ndarray, int]:
        try:
            if self.kind == "latents":
                pixels = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
            else:
                pixels = decode_png(sample["png"], self.shape[-1])
            label = int(sample["cls"])
        except Exception as error:  # bytes damaged after sharding: fail, naming the shard
            raise storage.StorageError(
                f"sample {sample.get('__key__')} of {sample.get('__url__')} cannot be decoded "
                f"({type(error).__name__}: {error}); the shard is damaged: re-run 'ldm shard'"
            ) from error
        if pixels.shape != self.shape:
            raise ValueError(
                f"sample {sample['__key__']} of {sample['__url__']} has shape {pixels.shape}, "
                f"the manifest says {self.shape}"
            )
        return pixels, label


class DecodedSplit:
    """Every sample of one split, decoded: per shard, its samples in shard order."""

    def __init__(self, arrays: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> None:
        self.arrays, self.labels = arrays, labels

    def batch(self, positions: Sequence[tuple[str, int]]) -> Batch:
        """The samples at ``positions`` ((shard name, index in it)) as one batch."""
        samples = [(self.arrays[name][i], int(self.labels[name][i])) for name, i in positions]
        return _collate(samples)


# The split this process keeps decoded: one at a time, so memory stays within the budget.
_KEPT: dict[tuple, DecodedSplit] = {}


def _decoded_split(
    folder: str, manifest: Manifest, split: Split, budget: int
) -> DecodedSplit | None:
    """The split decoded in memory when it fits ``budget`` bytes (read and verified on
    the first call, kept for later ones), else None."""
    shards = manifest.split_shards(split)
    item_bytes = 4 if manifest.kind == "latents" else 1  # float32 latents, uint8 pixels
    per_sample = manifest.image_size**2 * manifest.channels * item_bytes
    if budget <= 0 or per_sample * sum(s.num_samples for s in shards) > budget:
        return None
    key = (folder, split, tuple((s.name, s.sha256) for s in shards))
    if key not in _KEPT:
        check_shards_exist(folder, shards)
        _KEPT.clear()  # the one kept before goes first
        reader = _RankShards(folder, list(shards), manifest, 1, 0, (0, 0, 0))
        arrays, labels = {}, {}
        for entry in shards:
            pairs = [reader._decode(s) for s in iter_verified_samples(folder, [entry])]
            arrays[entry.name] = np.stack([array for array, _ in pairs])
            labels[entry.name] = np.array([label for _, label in pairs], dtype=np.int64)
        _KEPT[key] = DecodedSplit(arrays, labels)
    return _KEPT[key]


def iter_verified_samples(folder: str, shards: Iterable[ShardEntry]) -> Iterator[dict]:
    """Raw samples ``{__key__, __url__, png | npy, cls, json}`` of ``shards`` in order; each
    shard's bytes, sha256 and sample count are checked against the manifest at its end."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    register_s3_opener()
    for entry in shards:
        url = storage.join(folder, entry.name)
        with _CheckedStream(wds.gopen(url, "rb")) as stream:
            count = 0
            for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                count += 1
                yield sample
            stream.verify(url, entry, count)


class _CheckedStream:
    """Hashes and counts the bytes read through it, to compare with the manifest."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def verify(self, url: str, entry: ShardEntry, count: int) -> None:
        while self.read(1 << 20):  # the tar reader may stop before the end padding
            pass
        found = (self.size, self.digest.hexdigest(), count)
        if found != (entry.num_bytes, entry.sha256, entry.num_samples):
            raise storage.StorageError(
                f"shard {url} does not match the manifest (bytes, sha256, samples): read "
                f"{found}, expected {(entry.num_bytes, entry.sha256, entry.num_samples)}; "
                "it is damaged or was replaced: re-run 'ldm shard'"
            )

    def __enter__(self) -> _CheckedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.raw.close()


def to_pixels(images: np.ndarray | Tensor) -> Tensor:
    """uint8 [B, H, W] or [B, H, W, C] → float32 [B, C, H, W] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    if x.dim() == 3:
        x = x[..., None]
    if x.dim() != 4:
        raise ValueError(f"expected images [B,H,W] or [B,H,W,C], got shape {tuple(x.shape)}")
    # Plain NCHW strides: with one channel, the permuted view already counts as
    # contiguous but its strides read as channels-last, which sends convolutions down
    # another (in bf16, 2.6× slower) path.
    return (
        x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(memory_format=torch.contiguous_format)
    )


def _collate(samples: list[tuple[np.ndarray, int]]) -> Batch:
    stacked = np.stack([array for array, _ in samples])
    images = to_pixels(stacked) if stacked.dtype == np.uint8 else torch.from_numpy(stacked)
    return images, torch.tensor([label for _, label in samples], dtype=torch.int64)


def _rebatch(batches: Iterable[Batch], size: int) -> Iterator[Batch]:
    """Worker batches of any size → batches of exactly ``size`` (the rest is held back)."""
    images: list[Tensor] = []
    labels: list[Tensor] = []
    held = 0
    for x, y in batches:
        images.append(x)
        labels.append(y)
        held += len(y)
        while held >= size:
            x_all = torch.cat(images) if len(images) > 1 else images[0]
            y_all = torch.cat(labels) if len(labels) > 1 else labels[0]
            yield x_all[:size], y_all[:size]
            images, labels, held = [x_all[size:]], [y_all[size:]], held - size


def _check_arguments(
    split: str, rank: int, world_size: int, batch_size: int, num_workers: int
) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
