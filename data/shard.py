"""The sharder: a source → ``train-NNNNNN.tar``, ``val-NNNNNN.tar`` and, last, ``manifest.json``.

The steps, in order:

1. check that the destination is reachable and writable (before any work);
2. list the source (``data.listing``: streamed, numbered in name order, never held);
3. plan: slot ``s`` of the dataset holds input ``π(s)`` of a seeded permutation
   (``data.permutation``); the first ``round(val_fraction · N)`` slots are ``val``,
   the rest ``train``, and shard ``j`` of a split holds its slots
   ``j·M … (j+1)·M-1`` (M = ``shard_max_samples``). The plan is computed one shard at
   a time, so the driver's memory does not grow with the dataset;
4. write: each shard is converted, tarred with a fixed mtime, checksummed and sent
   unless the destination already holds it with that checksum
   (``data.shard_writer``), by threads here or by Ray tasks across a cluster
   (``data.shard_engines``). The same source and options give byte-identical shards
   and manifest whichever engine and however many workers wrote them, and a re-run
   after an interruption only sends what is missing;
5. write the manifest last. An older manifest is deleted before the first shard that
   differs from it is sent, so a manifest never describes shards that are not there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data import storage
from data.listing import Listing, open_listing
from data.manifest import (
    FORMAT_VERSION,
    SPLITS,
    Manifest,
    ShardEntry,
    ShardOptions,
    SkippedInput,
    load_manifest,
    manifest_url,
)
from data.permutation import SeededPermutation
from data.shard_engines import Engine, write_shards
from data.shard_writer import ShardTask, input_content
from data.sources import check_folder


@dataclass(frozen=True)
class ShardReport:
    """What :func:`shard_dataset` did: the manifest it wrote and which shards it sent."""

    manifest: Manifest
    url: str
    uploaded: tuple[str, ...]
    reused: tuple[str, ...]
    seconds: float

    def summary(self) -> str:
        """One paragraph for people: samples, shards, bytes, skipped inputs, where."""
        m = self.manifest
        total = sum(m.counts.values())
        size = sum(s.num_bytes for s in m.shards)
        return (
            f"Wrote {total:,} samples ({m.counts['train']:,} train, {m.counts['val']:,} val) "
            f"of {m.image_size}×{m.image_size}×{m.channels} images from {m.source} into "
            f"{len(m.shards)} shards ({size / 1e6:,.1f} MB) at {self.url}: "
            f"{len(self.uploaded)} written, {len(self.reused)} already there with the right "
            f"checksum. {len(m.skipped):,} inputs skipped (listed with reasons under 'skipped' "
            f"in the manifest). Manifest: {manifest_url(self.url)}. Took {self.seconds:.1f} s "
            f"({total / max(self.seconds, 1e-9):,.0f} images/s)."
        )


def shard_dataset(
    source: str,
    out_url: str,
    options: ShardOptions | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
    engine: Engine = "threads",
) -> ShardReport:
    """Shard ``source`` (``mnist``, an image folder or ``.npz``, local or ``s3://``) into
    WebDataset tars plus ``manifest.json`` at ``out_url`` (a folder or ``s3://bucket/prefix``).

    ``engine``: ``threads`` writes shards from this process, ``workers`` at once
    (default: one per CPU, at most 8); ``ray`` writes each shard as a Ray task on the
    connected cluster, ``workers`` at once (default: the cluster's CPUs); the source
    and destination must then be reachable from every node. Raises ValueError for an
    unusable source or options, :class:`storage.StorageError` for a destination that
    cannot be reached; in both cases no manifest is written.
    """
    started = time.perf_counter()
    options = options or ShardOptions()
    out_url = out_url.rstrip("/")
    check_locations(source, out_url)
    described = _describe(source)
    replaces_manifest = _check_previous(out_url, described, options)
    with _listed(source) as listing:
        if not listing.count:
            listed = [SkippedInput(input=s.ref, reason=s.reason) for s in listing.skipped()]
            raise ValueError(f"SOURCE '{source}' holds no usable images{_reasons(listed)}")
        entries: list[ShardEntry] = []
        skipped = [SkippedInput(input=s.ref, reason=s.reason) for s in listing.skipped()]
        fingerprint, sent, reused = _fingerprint_start(options, listing.class_names), [], []
        tasks = plan_shards(listing, options)
        results = write_shards(engine, tasks, options, out_url, replaces_manifest, workers)
        with _progress(listing.count, progress) as bar:
            for result in results:
                bar.update(result.num_inputs)
                fingerprint.update(_shard_line(result.split, result.index, result.content))
                skipped += result.skipped
                if result.entry is not None:
                    entries.append(result.entry)
                    (sent if result.sent else reused).append(result.entry.name)
        class_names = listing.class_names
    if not entries:
        raise ValueError(f"none of the inputs of '{source}' could be used{_reasons(skipped)}")
    manifest = Manifest(
        image_size=options.image_size,
        channels=options.channels,
        class_names=class_names,
        counts={s: sum(e.num_samples for e in entries if e.split == s) for s in SPLITS},
        shards=tuple(entries),
        source=described,
        options=options,
        fingerprint=fingerprint.hexdigest(),
        skipped=tuple(skipped),
    )
    storage.write_bytes(manifest_url(out_url), manifest.to_json())
    return ShardReport(manifest, out_url, tuple(sent), tuple(reused), time.perf_counter() - started)


def check_locations(source: str, out_url: str) -> None:
    """Fail before any work (or any cluster is joined) when ``source`` does not exist or
    ``out_url`` cannot be written or lies inside the source."""
    if source != "mnist" and not source.lower().endswith(".npz"):
        check_folder(source)
    elif source != "mnist" and storage.stat(source) is None:
        raise ValueError(f"SOURCE '{source}' does not exist")
    _check_not_nested(source, out_url.rstrip("/"))
    _prepare_destination(out_url.rstrip("/"))


def plan_shards(listing: Listing, options: ShardOptions) -> Iterator[ShardTask]:
    """The shards of ``train`` then ``val``, one at a time (see the module's step 3)."""
    permutation = SeededPermutation(listing.count, options.seed)
    num_val = round(options.val_fraction * listing.count)
    per_shard = options.shard_max_samples
    for split, first, end in (("train", num_val, listing.count), ("val", 0, num_val)):
        for index, start in enumerate(range(first, end, per_shard)):
            positions = permutation(range(start, min(start + per_shard, end)))
            inputs = tuple(listing.inputs_at(positions.tolist()))
            pixels = listing.pixels_at(positions.tolist())
            yield ShardTask(split, index, start - first, inputs, pixels)


def split_order(num_inputs: int, options: ShardOptions) -> tuple[list[int], list[int]]:
    """Input positions of (train, val) in slot order: the seeded permutation, its first
    ``round(val_fraction · N)`` slots for val. Same N and options → same split."""
    order = SeededPermutation(num_inputs, options.seed)(range(num_inputs)).tolist()
    num_val = round(options.val_fraction * num_inputs)
    return order[num_val:], order[:num_val]


def existing_dataset(source: str, out_url: str, options: ShardOptions) -> Manifest | None:
    """The manifest at ``out_url`` if it was written from exactly the current content of
    ``source`` with ``options`` (same fingerprint), else None. Reads every input once but
    decodes nothing, so it is much cheaper than sharding again."""
    try:
        previous = load_manifest(out_url)
    except (FileNotFoundError, ValueError):
        return None
    if previous.options != options or previous.source != _describe(source):
        return None
    with _listed(source) as listing:
        fingerprint = _fingerprint_start(options, listing.class_names)
        for task in plan_shards(listing, options):
            fingerprint.update(_shard_line(task.split, task.index, input_content(task)))
    return previous if fingerprint.hexdigest() == previous.fingerprint else None


@contextlib.contextmanager
def _listed(source: str) -> Iterator[Listing]:
    """The source's listing, its scratch files removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="ldm-listing-") as scratch:
        listing = open_listing(source, Path(scratch))
        try:
            yield listing
        finally:
            listing.close()


def _fingerprint_start(options: ShardOptions, class_names: tuple[str, ...]) -> Any:
    """sha256 over the format, the options, the classes and then, shard by shard in
    plan order, each shard's inputs (names, labels, content digests)."""
    fingerprint = hashlib.sha256(f"{FORMAT_VERSION}\n{options.model_dump_json()}\n".encode())
    fingerprint.update(("\n".join(class_names) + "\n").encode())
    return fingerprint


def _shard_line(split: str, index: int, content: str) -> bytes:
    return f"{split}\t{index}\t{content}\n".encode()


def _describe(source: str) -> str:
    if source == "mnist" or source.startswith("s3://"):
        return source.rstrip("/")
    return str(Path(source.removeprefix("file://")).resolve())


def _reasons(skipped: list[SkippedInput], shown: int = 3) -> str:
    if not skipped:
        return " (it is empty)"
    first = "; ".join(f"{s.input}: {s.reason}" for s in skipped[:shown])
    return f" ({len(skipped)} inputs skipped, e.g. {first})"


def _check_not_nested(source: str, out_url: str) -> None:
    """Writing into the source would make the next listing read its own shards."""
    if source == "mnist" or source.lower().endswith(".npz"):
        return
    inner = (out_url if out_url.startswith("s3://") else _describe(out_url)).rstrip("/") + "/"
    outer = _describe(source).rstrip("/") + "/"
    if inner.startswith(outer):
        raise ValueError(f"OUT_URL {out_url} is inside SOURCE {source}: write it elsewhere")


def _prepare_destination(out_url: str) -> None:
    """Fail before any work if the destination cannot be written (creates nothing)."""
    loc = storage.parse(out_url)
    if loc.is_s3:
        storage.check_access(out_url)
        return
    existing = loc.path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise storage.StorageError(f"cannot create or write the output folder {loc.path}")


def _check_previous(out_url: str, described: str, options: ShardOptions) -> bool:
    """True if ``out_url`` holds a manifest of this same job; error if of another one."""
    try:
        previous = load_manifest(out_url)
    except FileNotFoundError:
        return False
    except ValueError:
        return True  # damaged: it will be replaced
    if previous.source != described or previous.options != options:
        raise ValueError(
            f"{out_url} already holds a dataset of {previous.source} with options "
            f"{previous.options.model_dump()}; write to another OUT_URL, or delete "
            f"{manifest_url(out_url)} and its shards first"
        )
    return True


def _progress(total: int, enabled: bool):  # -> tqdm
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="sharding", disable=not enabled, file=sys.stderr)
