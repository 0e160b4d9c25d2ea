"""One shard, start to finish: its inputs → a tar → its place at the destination.

This is the unit of work of every engine (a thread of ``ldm shard``, or a Ray task on
any node): it needs only the source's name, the inputs of its shard, the options and
the destination, and it returns a small :class:`ShardResult`. What a shard holds is
fixed by the plan alone (``data.shard``): the inputs at ``shard_max_samples``
consecutive slots of its split; an input that cannot be used is skipped and named,
and leaves its slot empty, so a skip never moves a sample into another shard. The
same inputs and options give the same bytes, whoever writes them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from data import storage
from data.convert import BadInput, array_to_image, check_pixels, decode, encode_png, prepare
from data.manifest import ShardEntry, ShardOptions, SkippedInput, Split, manifest_url
from data.sources import Input

TAR_MTIME = 0  # fixed tar header time: part of what makes shards reproducible
S3_READ_THREADS = 8  # inputs read at once per shard from S3 (~20-50 ms a GET)


@dataclass(frozen=True)
class ShardTask:
    """The inputs of shard ``index`` of ``split``; sample keys count slots from
    ``first_slot`` (the slot of its first input within the split). ``pixels``: for an
    array source, the inputs' pixels uint8 [len(inputs), H, W(, C)] (files are read
    from their URLs by whoever writes the shard)."""

    split: Split
    index: int
    first_slot: int
    inputs: tuple[Input, ...]
    pixels: np.ndarray | None = None

    def raw(self, k: int) -> bytes | np.ndarray:
        """Input ``k``'s content: encoded file bytes, or its pixels [H, W(, C)]."""
        if self.pixels is not None:
            return self.pixels[k]
        return storage.read_bytes(self.inputs[k].url)

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"


@dataclass(frozen=True)
class ShardResult:
    """What writing one shard gave: how many inputs it had, its manifest entry (None
    when every input was skipped), the skipped inputs, a digest of its inputs' content
    (for the dataset's fingerprint) and whether it was sent (False: the destination
    already held it). Small: the task's inputs do not travel back."""

    split: Split
    index: int
    num_inputs: int
    entry: ShardEntry | None
    skipped: tuple[SkippedInput, ...]
    content: str
    sent: bool


@dataclass(frozen=True)
class _Converted:
    digest: str  # sha256 of the raw input, for the fingerprint
    png: bytes | None = None
    reason: str | None = None  # why it was skipped


def write_shard(
    task: ShardTask,
    options: ShardOptions,
    out_url: str,
    replaces_manifest: bool,
    threads: int | None = None,
) -> ShardResult:
    """Convert ``task``'s inputs and put the shard at ``out_url`` unless
    it already holds these exact bytes. ``replaces_manifest``: an older manifest may be
    at ``out_url``; it is deleted before this shard is sent, so a manifest never
    describes shards that are not there. ``threads`` convert inputs in parallel
    (default: :data:`S3_READ_THREADS` for inputs on S3, whose reads wait on the network
    far longer than they take to decode; else 1)."""
    if threads is None:
        on_s3 = any(item.url.startswith("s3://") for item in task.inputs[:1])
        threads = S3_READ_THREADS if on_s3 else 1
    content = hashlib.sha256()
    skipped: list[SkippedInput] = []
    with _scratch(out_url) as scratch:
        local = Path(scratch) / task.name
        written = 0
        with SampleTar(local) as tar:
            convert = partial(_convert, task, options)
            converted = _ordered_map(convert, range(len(task.inputs)), threads)
            for slot, (k, result) in enumerate(converted, start=task.first_slot):
                item = task.inputs[k]
                content.update(content_line(task.split, item, result.digest))
                if result.png is None:
                    skipped.append(SkippedInput(input=item.ref, reason=result.reason or ""))
                    continue
                meta = {"path": item.ref} if item.url else {"index": item.index}
                tar.write(f"{slot:09d}", png=result.png, cls=item.label, meta=meta)
                written += 1
        if not written:
            return ShardResult(
                task.split,
                task.index,
                len(task.inputs),
                None,
                tuple(skipped),
                content.hexdigest(),
                False,
            )
        entry = ShardEntry(
            name=task.name,
            split=task.split,
            num_samples=written,
            num_bytes=local.stat().st_size,
            sha256=storage.sha256_file(local),
        )
        sent = _publish(local, entry, out_url, replaces_manifest)
    return ShardResult(
        task.split, task.index, len(task.inputs), entry, tuple(skipped), content.hexdigest(), sent
    )


class SampleTar:
    """A WebDataset shard: per sample ``KEY.cls`` (the class id as text), ``KEY.json``
    (where the input came from) and ``KEY.png``, in that order, with fixed owner, mode
    and mtime, as webdataset's ``TarWriter`` writes them (a test compares the bytes).
    Written with ``tarfile`` alone: a Ray worker that only writes shards does not load
    webdataset, and with it torch, which would take longer than a shard."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 (closed by __exit__)
        self._tar = tarfile.open(fileobj=self._file, mode="w|")  # noqa: SIM115

    def write(self, key: str, png: bytes, cls: int, meta: dict) -> None:
        fields = {"cls": str(cls).encode(), "json": json.dumps(meta).encode(), "png": png}
        for extension, value in fields.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(value), TAR_MTIME, 0o444
            info.uname = info.gname = "bigdata"
            self._tar.addfile(info, io.BytesIO(value))

    def __enter__(self) -> SampleTar:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tar.close()
        self._file.close()


def input_content(task: ShardTask) -> str:
    """The content digest :func:`write_shard` would report, from reading the inputs
    only (no decoding): how a finished dataset is recognised without redoing it."""
    content = hashlib.sha256()
    for k, item in enumerate(task.inputs):
        try:
            digest = input_digest(task.raw(k))
        except OSError:
            digest = ""
        content.update(content_line(task.split, item, digest))
    return content.hexdigest()


def content_line(split: str, item: Input, digest: str) -> bytes:
    return f"{split}\t{item.ref}\t{item.label}\t{digest}\n".encode()


def input_digest(raw: bytes | np.ndarray) -> str:
    if isinstance(raw, np.ndarray):
        return hashlib.sha256(str(raw.shape).encode() + raw.tobytes()).hexdigest()
    return hashlib.sha256(raw).hexdigest()


def _publish(local: Path, entry: ShardEntry, out_url: str, replaces_manifest: bool) -> bool:
    target = storage.join(out_url, entry.name)
    if storage.has_content(target, entry.num_bytes, entry.sha256):
        return False
    if replaces_manifest:  # the old manifest no longer describes what is here
        storage.delete(manifest_url(out_url))
    storage.put_file(local, target, metadata={"sha256": entry.sha256})
    return True


def _convert(task: ShardTask, options: ShardOptions, k: int) -> _Converted:
    """Input ``k`` → PNG bytes of uint8 [S, S, C], or the reason it cannot be used."""
    try:
        raw = task.raw(k)
    except FileNotFoundError:
        return _Converted(digest="", reason="disappeared while sharding")
    except OSError as error:  # local permission problems and the like
        return _Converted(digest="", reason=f"cannot be read ({error})")
    digest = input_digest(raw)
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


def _ordered_map(
    fn: Callable[[int], _Converted], items: Iterable[int], threads: int
) -> Iterator[tuple[int, _Converted]]:
    """``(item, fn(item))`` in input order, computed by ``threads`` threads with a bounded
    look-ahead. Pillow and boto3 release the GIL while they work."""
    if threads <= 1:
        yield from ((item, fn(item)) for item in items)
        return
    with ThreadPoolExecutor(threads) as pool:
        window: deque[tuple[int, Future]] = deque()
        for item in items:
            window.append((item, pool.submit(fn, item)))
            if len(window) >= 4 * threads:
                first, future = window.popleft()
                yield first, future.result()
        while window:
            first, future = window.popleft()
            yield first, future.result()


def _scratch(out_url: str) -> tempfile.TemporaryDirectory:
    """A local shard is built next to its destination (a rename, not a copy); one for
    S3 in the system's temporary folder."""
    loc = storage.parse(out_url)
    if not loc.is_s3:
        loc.path.mkdir(parents=True, exist_ok=True)
    folder = None if loc.is_s3 else loc.path
    return tempfile.TemporaryDirectory(prefix=f".ldm-shard-{os.getpid()}-", dir=folder)
