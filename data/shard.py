"""The writer: a source → ``train-NNNNNN.tar``, ``val-NNNNNN.tar`` and, last, ``manifest.json``.

The steps, in order:

1. check that the destination is reachable and writable (before any work);
2. list the source; split its inputs into train/val with ``seed`` (a permutation, so
   classes are mixed across shards);
3. per split, decode → convert → PNG-encode inputs in a thread pool (results kept in
   input order) and write samples with webdataset's ``ShardWriter`` into a local
   temporary folder, tar headers with a fixed mtime, so the same source and options
   give byte-identical shards;
4. as each shard closes: sha256 it, and upload it unless the destination already holds
   it with that checksum (so a re-run after an interruption only sends what is missing);
5. write the manifest last. An older manifest is deleted before the first shard that
   differs from it is written, so a manifest never describes shards that are not there.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from data import storage
from data.convert import BadInput, array_to_image, check_pixels, decode, encode_png, prepare
from data.manifest import (
    FORMAT_VERSION,
    SPLITS,
    Manifest,
    ShardEntry,
    ShardOptions,
    SkippedInput,
    Split,
    load_manifest,
    manifest_url,
)
from data.sources import Input, Source, open_source

TAR_MTIME = 0  # fixed tar header time: part of what makes shards reproducible


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


@dataclass(frozen=True)
class _Converted:
    digest: str  # sha256 of the raw input, for the fingerprint
    png: bytes | None = None
    reason: str | None = None  # why it was skipped


def shard_dataset(
    source: str,
    out_url: str,
    options: ShardOptions | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> ShardReport:
    """Shard ``source`` (``mnist``, an image folder or ``.npz``, local or ``s3://``) into
    WebDataset tars plus ``manifest.json`` at ``out_url`` (a folder or ``s3://bucket/prefix``).

    ``workers`` threads decode and encode images (default: up to 8, one per CPU).
    Raises ValueError for an unusable source or options, :class:`storage.StorageError`
    for a destination that cannot be reached; in both cases no manifest is written.
    """
    started = time.perf_counter()
    options = options or ShardOptions()
    out_url = out_url.rstrip("/")
    _check_not_nested(source, out_url)
    _prepare_destination(out_url)
    src = open_source(source)
    if not src.inputs:
        listed = [SkippedInput(input=s.ref, reason=s.reason) for s in src.skipped]
        raise ValueError(f"SOURCE '{source}' holds no usable images{_reasons(listed)}")
    described = _describe(source)
    publisher = _Publisher(out_url, _check_previous(out_url, described, options))
    with _scratch_folder(out_url) as scratch, _progress(len(src.inputs), progress) as bar:
        try:
            entries, skipped, content = _write_splits(
                src, options, scratch, publisher, workers, bar
            )
            publisher.finish()
        finally:
            publisher.close()
    if not entries:
        raise ValueError(f"none of the inputs of '{source}' could be used{_reasons(skipped)}")
    fingerprint = _fingerprint(options, src.class_names, content)
    manifest = Manifest(
        image_size=options.image_size,
        channels=options.channels,
        class_names=src.class_names,
        counts={s: sum(e.num_samples for e in entries if e.split == s) for s in SPLITS},
        shards=tuple(entries),
        source=described,
        options=options,
        fingerprint=fingerprint,
        skipped=tuple(skipped),
    )
    storage.write_bytes(manifest_url(out_url), manifest.to_json())
    uploaded, reused = tuple(publisher.uploaded), tuple(publisher.reused)
    return ShardReport(manifest, out_url, uploaded, reused, time.perf_counter() - started)


def _write_splits(
    src: Source,
    options: ShardOptions,
    scratch: str,
    publisher: _Publisher,
    workers: int | None,
    bar: Any,
) -> tuple[list[ShardEntry], list[SkippedInput], str]:
    """Every input → a sample in its split's shards or a skip. Returns the shard entries,
    every skipped input, and a digest of all inputs' content (for the fingerprint)."""
    entries: list[ShardEntry] = []
    skipped = [SkippedInput(input=s.ref, reason=s.reason) for s in src.skipped]
    content = hashlib.sha256()
    for split, order in zip(SPLITS, split_order(len(src.inputs), options), strict=True):
        write = _SplitWriter(split, Path(scratch), options, publisher)
        items = (src.inputs[i] for i in order)
        for item, result in _ordered_map(partial(_convert, src, options), items, workers):
            content.update(_content_line(split, item, result.digest))
            bar.update(1)
            if result.png is None:
                skipped.append(SkippedInput(input=item.ref, reason=result.reason or ""))
            else:
                write(item, result.png)
        entries += write.close()
    return entries, skipped, content.hexdigest()


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
    src = open_source(source)
    content = hashlib.sha256()
    for split, order in zip(SPLITS, split_order(len(src.inputs), options), strict=True):
        for item in (src.inputs[i] for i in order):
            try:
                digest = _input_digest(src.read(item))
            except OSError:
                digest = ""
            content.update(_content_line(split, item, digest))
    fingerprint = _fingerprint(options, src.class_names, content.hexdigest())
    return previous if fingerprint == previous.fingerprint else None


def _input_digest(raw: bytes | np.ndarray) -> str:
    if isinstance(raw, np.ndarray):
        return hashlib.sha256(str(raw.shape).encode() + raw.tobytes()).hexdigest()
    return hashlib.sha256(raw).hexdigest()


def _content_line(split: str, item: Input, digest: str) -> bytes:
    return f"{split}\t{item.ref}\t{item.label}\t{digest}\n".encode()


def _fingerprint(options: ShardOptions, class_names: tuple[str, ...], content: str) -> str:
    fingerprint = hashlib.sha256(f"{FORMAT_VERSION}\n{options.model_dump_json()}\n".encode())
    fingerprint.update(("\n".join(class_names) + "\n" + content).encode())
    return fingerprint.hexdigest()


def split_order(num_inputs: int, options: ShardOptions) -> tuple[list[int], list[int]]:
    """Input positions of (train, val): a seeded permutation, the first
    ``round(val_fraction · N)`` of it for val. Same N and options → same split."""
    permutation = np.random.default_rng(options.seed).permutation(num_inputs).tolist()
    num_val = round(options.val_fraction * num_inputs)
    return permutation[num_val:], permutation[:num_val]


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


def _convert(src: Source, options: ShardOptions, item: Input) -> _Converted:
    """One input → PNG bytes of uint8 [S, S, C], or the reason it cannot be used."""
    try:
        raw = src.read(item)
    except FileNotFoundError:
        return _Converted(digest="", reason="disappeared while sharding")
    except OSError as error:  # local permission problems and the like
        return _Converted(digest="", reason=f"cannot be read ({error})")
    digest = _input_digest(raw)
    try:
        if isinstance(raw, np.ndarray):
            check_pixels(raw.shape[1], raw.shape[0], options.max_image_pixels)
            image = array_to_image(raw)
        else:
            image = decode(raw, options.max_image_pixels)
        pixels = prepare(image, options.image_size, options.channels)
    except BadInput as error:
        return _Converted(digest=digest, reason=str(error))
    except Exception as error:  # an odd mode Pillow cannot convert: skip, do not crash
        return _Converted(
            digest=digest, reason=f"cannot be converted ({type(error).__name__}: {error})"
        )
    return _Converted(digest=digest, png=encode_png(pixels))


class _SplitWriter:
    """Samples of one split → shards in ``scratch`` via webdataset, handed to the publisher."""

    def __init__(self, split: Split, scratch: Path, options: ShardOptions, publisher: _Publisher):
        self.split, self.scratch, self.options, self.publisher = split, scratch, options, publisher
        self.entries: list[ShardEntry] = []
        self.counts: dict[str, int] = {}
        self.sink = None
        self.written = 0

    def __call__(self, item: Input, png: bytes) -> None:
        import webdataset as wds

        if self.sink is None:  # opened on the first sample: a split may have none
            pattern = str(self.scratch / f"{self.split}-%06d.tar")
            self.sink = wds.ShardWriter(
                pattern,
                self.options.shard_max_samples,
                post=self._closed,
                verbose=0,
                mtime=TAR_MTIME,
            )
        meta = {"path": item.ref} if item.url else {"index": item.index}
        self.sink.write(
            {"__key__": f"{self.written:09d}", "png": png, "cls": item.label, "json": meta}
        )
        self.counts[self.sink.fname] = self.counts.get(self.sink.fname, 0) + 1
        self.written += 1

    def _closed(self, fname: str) -> None:
        path = Path(fname)
        entry = ShardEntry(
            name=path.name,
            split=self.split,
            num_samples=self.counts.pop(fname),
            num_bytes=path.stat().st_size,
            sha256=storage.sha256_file(path),
        )
        self.entries.append(entry)
        self.publisher.submit(path, entry)

    def close(self) -> list[ShardEntry]:
        if self.sink is not None:
            self.sink.close()
        return self.entries


@dataclass
class _Publisher:
    """Sends finished shards to the destination on one background thread, so encoding
    goes on during uploads; at most two shards wait on local disk."""

    out_url: str
    delete_old_manifest: bool
    uploaded: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))
    _pending: deque[Future] = field(default_factory=deque)

    def submit(self, local: Path, entry: ShardEntry) -> None:
        while len(self._pending) >= 2:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._send, local, entry))

    def _send(self, local: Path, entry: ShardEntry) -> None:
        target = storage.join(self.out_url, entry.name)
        if storage.has_content(target, entry.num_bytes, entry.sha256):
            local.unlink()
            self.reused.append(entry.name)
            return
        if self.delete_old_manifest:  # the old manifest no longer describes what is here
            storage.delete(manifest_url(self.out_url))
            self.delete_old_manifest = False
        storage.put_file(local, target, metadata={"sha256": entry.sha256})
        self.uploaded.append(entry.name)

    def finish(self) -> None:
        """Wait for every upload; raises the first upload error."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Stop the upload thread (after an error: without sending what is still queued)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _ordered_map(
    fn: Callable[[Input], _Converted], items: Iterable[Input], workers: int | None
) -> Iterator[tuple[Input, _Converted]]:
    """``(item, fn(item))`` in input order, computed by ``workers`` threads with a bounded
    look-ahead (memory stays flat). Pillow and boto3 release the GIL while they work."""
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1:
        yield from ((item, fn(item)) for item in items)
        return
    with ThreadPoolExecutor(workers) as pool:
        window: deque[tuple[Input, Future]] = deque()
        for item in items:
            window.append((item, pool.submit(fn, item)))
            if len(window) >= 4 * workers:
                first, future = window.popleft()
                yield first, future.result()
        while window:
            first, future = window.popleft()
            yield first, future.result()


def _scratch_folder(out_url: str) -> tempfile.TemporaryDirectory:
    """Local shards are built next to their destination (a rename, not a copy)."""
    loc = storage.parse(out_url)
    if not loc.is_s3:
        loc.path.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".ldm-shard-", dir=None if loc.is_s3 else loc.path)


def _progress(total: int, enabled: bool):  # -> tqdm
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="sharding", disable=not enabled, file=sys.stderr)
