"""The latent cache: the training split encoded once by the trained autoencoder.

Each image shard becomes one latent shard (``npy`` float32 [C, h, w] scaled latents
plus the class id), written by a Ray task (``cache_latents``) or, inside a Ray Train
worker group that trained the autoencoder, by its ranks (``cache_latents_on_ranks``),
so the denoiser and classifier stages never run the encoder per step. The cache has
its own manifest (kind ``latents``) and is read with the same reader as the images.

Resumable at any size: beside each latent shard its task writes a record
``done/<shard>.json`` (its manifest entry, the cache's fingerprint and the image
shard's sha256). A task whose record matches, and whose shard is still there with
the recorded size, returns the recorded entry without encoding, so a re-run after an
interruption only encodes what is missing, and the driver never reads the shards
itself (it only collects entries). Each worker process loads the autoencoder once,
however many shards it encodes. The ranks of a GPU worker group encode on their GPU
(:func:`training.models.encode_batch`); Ray tasks encode on the CPU.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from data import storage
from data.convert import decode_png
from data.manifest import Manifest, ShardEntry, load_manifest, manifest_url
from data.reader import iter_verified_samples, manifest_url_of
from training.checkpoints import load_autoencoder
from training.config import LDMConfig
from training.models import ENCODE_BATCH, Autoencoder, encode_batch


def cache_latents(
    data_url: str, autoencoder_checkpoint: str, out_url: str, config: LDMConfig
) -> str:
    """Encode the ``train`` split of ``data_url`` into latent shards under ``out_url``,
    a Ray task per shard.

    Returns the folder URL of the latent dataset. A cache whose manifest already
    names this dataset and this autoencoder checkpoint is reused as it is.
    """
    cache = _LatentCache.plan(data_url, autoencoder_checkpoint, out_url, config)
    if cache.complete():
        return cache.out_url
    cache.forget_manifest()
    encode = ray.remote(num_cpus=1)(_encode_shard)
    pending = [encode.remote(*cache.shard_args(entry)) for entry in cache.shards]
    cache.write_manifest([ShardEntry.model_validate(done) for done in ray.get(pending)])
    return cache.out_url


def cache_latents_on_ranks(
    data_url: str,
    autoencoder_checkpoint: str,
    out_url: str,
    config: LDMConfig,
    rank: int,
    world: int,
    threads: int,
    device: torch.device | str = "cpu",
) -> str:
    """The same cache made by the ranks of a Ray Train worker group (no task of its
    own to start): rank r encodes shards r, r + world, …, on its ``device`` (with
    ``threads`` torch threads), and rank 0 writes the manifest once every rank is done.
    Every rank calls it; it returns when the cache is complete."""
    from ray.train.collective import barrier

    cache = _LatentCache.plan(data_url, autoencoder_checkpoint, out_url, config)
    if cache.complete():  # every rank reads the same manifest: all return, or none
        return cache.out_url
    if rank == 0:
        cache.forget_manifest()
    for entry in cache.shards[rank::world]:
        _encode_shard(*cache.shard_args(entry), threads=threads, device=str(device))
    barrier()
    if rank == 0:
        cache.write_manifest([cache.recorded(entry) for entry in cache.shards])
    barrier()
    return cache.out_url


@dataclass(frozen=True)
class _LatentCache:
    """The latent cache of one dataset and one autoencoder checkpoint."""

    source_url: str
    images: Manifest
    autoencoder_checkpoint: str
    out_url: str
    config: LDMConfig
    fingerprint: str

    @classmethod
    def plan(
        cls, data_url: str, autoencoder_checkpoint: str, out_url: str, config: LDMConfig
    ) -> _LatentCache:
        source_url = manifest_url_of(data_url)
        images = load_manifest(source_url)
        fingerprint = hashlib.sha256(
            f"{images.fingerprint}\n{autoencoder_checkpoint}\n"
            f"{config.autoencoder.model_dump_json()}".encode()
        ).hexdigest()
        return cls(
            source_url, images, autoencoder_checkpoint, out_url.rstrip("/"), config, fingerprint
        )

    @property
    def shards(self) -> list[ShardEntry]:
        return list(self.images.split_shards("train"))

    def complete(self) -> bool:
        """Whether a manifest of this very cache is already there."""
        if storage.stat(manifest_url(self.out_url)) is None:
            return False
        try:
            return load_manifest(self.out_url).fingerprint == self.fingerprint
        except ValueError:
            return False  # damaged or edited: rebuilt

    def forget_manifest(self) -> None:
        """Shards are about to be replaced: the old manifest must not describe them."""
        if storage.stat(manifest_url(self.out_url)) is not None:
            storage.delete(manifest_url(self.out_url))

    def shard_args(self, entry: ShardEntry) -> tuple:
        folder = self.source_url.rsplit("/", 1)[0]
        return (
            folder,
            entry.model_dump(),
            self.images.channels,
            self.autoencoder_checkpoint,
            self.out_url,
            self.fingerprint,
        )

    def recorded(self, entry: ShardEntry) -> ShardEntry:
        """The latent shard of image shard ``entry``, as its encoder recorded it."""
        record_url = storage.join(self.out_url, f"done/{entry.name}.json")
        done = _recorded(record_url, self.out_url, self.fingerprint, entry.sha256)
        if done is None:
            raise RuntimeError(f"{entry.name} was not encoded into {self.out_url}")
        return ShardEntry.model_validate(done)

    def write_manifest(self, entries: list[ShardEntry]) -> None:
        latent = Manifest(
            kind="latents",
            image_size=self.config.latent_size,
            channels=self.config.autoencoder.latent_channels,
            class_names=self.images.class_names,
            counts={"train": sum(e.num_samples for e in entries), "val": 0},
            shards=tuple(entries),
            source=f"{self.source_url} encoded by {self.autoencoder_checkpoint}",
            fingerprint=self.fingerprint,
        )
        storage.write_bytes(manifest_url(self.out_url), latent.to_json())


def _encode_shard(
    folder: str,
    entry_json: dict,
    channels: int,
    autoencoder_checkpoint: str,
    out_url: str,
    fingerprint: str,
    threads: int = 1,
    device: str = "cpu",
) -> dict:
    """One image shard → one latent shard at ``out_url`` (a Ray task, or a rank of a
    worker group); returns its entry (the recorded one when an earlier run already
    wrote this shard of this cache)."""
    entry = ShardEntry.model_validate(entry_json)
    record_url = storage.join(out_url, f"done/{entry.name}.json")
    done = _recorded(record_url, out_url, fingerprint, entry.sha256)
    if done is not None:
        return done
    written = _encode(folder, entry, channels, autoencoder_checkpoint, out_url, threads, device)
    record = {"entry": written, "fingerprint": fingerprint, "source_sha256": entry.sha256}
    storage.write_bytes(record_url, json.dumps(record).encode())
    return written


def _recorded(record_url: str, out_url: str, fingerprint: str, source_sha256: str) -> dict | None:
    """The entry an earlier task recorded for this shard of this cache, if its shard is
    still there with the recorded size; else None."""
    try:
        record = json.loads(storage.read_bytes(record_url))
    except (FileNotFoundError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint or record.get("source_sha256") != source_sha256:
        return None
    entry = ShardEntry.model_validate(record["entry"])
    found = storage.stat(storage.join(out_url, entry.name))
    return entry.model_dump() if found is not None and found[0] == entry.num_bytes else None


@functools.lru_cache(maxsize=1)
def _autoencoder(checkpoint: str, device: str) -> Autoencoder:  # once per worker process
    return load_autoencoder(checkpoint).to(device)


def _encode(
    folder: str,
    entry: ShardEntry,
    channels: int,
    autoencoder_checkpoint: str,
    out_url: str,
    threads: int,
    device: str = "cpu",
) -> dict:
    import webdataset as wds

    torch.set_num_threads(threads)
    autoencoder = _autoencoder(autoencoder_checkpoint, device)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / entry.name
        count = 0
        with wds.TarWriter(str(local), mtime=0) as sink:
            for keys, labels, pixels in _batches(iter_verified_samples(folder, [entry]), channels):
                latents = encode_batch(autoencoder, pixels)
                for key, label, latent in zip(keys, labels, latents, strict=True):
                    sink.write({"__key__": key, "npy": _npy_bytes(latent), "cls": str(label)})
                    count += 1
        digest = storage.sha256_file(local)
        size = local.stat().st_size
        storage.put_file(local, storage.join(out_url, entry.name), {"sha256": digest})
    return ShardEntry(
        name=entry.name, split="train", num_samples=count, num_bytes=size, sha256=digest
    ).model_dump()


def _batches(samples, channels: int):
    """Raw image samples → (keys, labels, pixels float32 [B, C, H, W]) of ENCODE_BATCH."""
    from data.reader import to_pixels

    keys, labels, images = [], [], []
    for sample in samples:
        keys.append(sample["__key__"])
        labels.append(int(sample["cls"]))
        images.append(decode_png(sample["png"], channels))
        if len(keys) == ENCODE_BATCH:
            yield keys, labels, to_pixels(np.stack(images))
            keys, labels, images = [], [], []
    if keys:
        yield keys, labels, to_pixels(np.stack(images))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
