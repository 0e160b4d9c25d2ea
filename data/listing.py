"""A listed source, numbered: input ``0 … count-1`` in name order, without holding it.

An image folder (local or ``s3://``) may hold more names than fit in memory. Its
listing streams into an SQLite file in a scratch folder (SQLite sorts on disk and
keeps a small page cache), which then numbers the inputs in name order and answers
"which inputs sit at these positions" for the shard plan. Memory stays flat however
long the listing; disk use is about 100 bytes per file. An S3 prefix is listed with
one stream per first-level folder at once (``data.s3_listing``). Array sources (``mnist``,
``.npz``) are in memory anyway and are numbered in place.

Both kinds answer the same questions: :attr:`count`, :attr:`class_names`,
:meth:`inputs_at`, :meth:`pixels_at` and :meth:`skipped`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Protocol

import numpy as np

from data import storage
from data.s3_listing import list_tree
from data.sources import (
    Input,
    Skipped,
    check_folder,
    classify,
    hidden,
    is_array_source,
    local_class_folders,
    open_array_source,
    walk_local_folder,
)

_BATCH = 2_000  # rows per INSERT or fetch
_SCHEMA = """
CREATE TABLE files (ref TEXT NOT NULL, url TEXT NOT NULL, folder TEXT);
CREATE TABLE skipped (ref TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE classes (name TEXT PRIMARY KEY, id INTEGER NOT NULL);
CREATE TABLE inputs (pos INTEGER PRIMARY KEY, ref TEXT NOT NULL, url TEXT NOT NULL,
                     label INTEGER NOT NULL);
"""


class Listing(Protocol):
    """What the sharder needs to know about a source."""

    description: str
    class_names: tuple[str, ...]
    count: int

    def inputs_at(self, positions: Sequence[int]) -> list[Input]:
        """The inputs at these positions (each in ``0 … count-1``), in the same order."""
        ...

    def pixels_at(self, positions: Sequence[int]) -> np.ndarray | None:
        """Array sources: the pixels of those inputs, uint8 [len, H, W(, C)]; else None."""
        ...

    def skipped(self) -> Iterator[Skipped]:
        """Entries of the source that are not inputs, with the reason, sorted by name."""
        ...

    def close(self) -> None:
        """Release what the listing holds (its database)."""
        ...


class ArrayListing:
    """``mnist`` or an ``.npz``: inputs are the array's usable rows."""

    def __init__(self, spec: str) -> None:
        source = open_array_source(spec)
        self.description, self.class_names = source.description, source.class_names
        self._inputs, self._skipped = source.inputs, source.skipped
        self._images = source.images
        self.count = len(source.inputs)

    def inputs_at(self, positions: Sequence[int]) -> list[Input]:
        return [self._inputs[p] for p in positions]

    def pixels_at(self, positions: Sequence[int]) -> np.ndarray | None:
        return self._images[[self._inputs[p].index for p in positions]]

    def skipped(self) -> Iterator[Skipped]:
        return iter(self._skipped)

    def close(self) -> None:
        pass  # the arrays stay cached for this process's shard writers


class FolderListing:
    """An image folder, local or ``s3://``, spilled to ``<scratch>/listing.sqlite``.

    Layout rules (see ``data.sources``): if any file sits in a sub-folder, the first
    folder level names the classes and top-level files are skipped; otherwise the
    folder is one unconditional class."""

    def __init__(self, url: str, scratch: Path) -> None:
        self._db = sqlite3.connect(scratch / "listing.sqlite", check_same_thread=False)
        self._db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + _SCHEMA)
        loc = storage.parse(url)
        entries = list_tree(url) if loc.is_s3 else walk_local_folder(loc.path)
        folders, in_folders = self._spill(entries)
        if in_folders and not loc.is_s3:
            folders |= local_class_folders(loc.path)
        self.class_names = tuple(sorted(folders)) if in_folders else ()
        self.count = self._number(in_folders)
        kind = f"{len(self.class_names)} class folders" if in_folders else "unconditional images"
        self.description = f"{url} ({kind})"

    def _spill(self, entries: Iterable[storage.Listed | Skipped]) -> tuple[set[str], bool]:
        """Every entry into ``files`` or ``skipped``; returns the first-level folder names
        seen and whether any visible file sits in a folder."""
        folders: set[str] = set()
        in_folders = False
        entries = iter(entries)
        while batch := list(islice(entries, _BATCH)):
            files, skipped = [], []
            for entry in batch:
                if isinstance(entry, Skipped):
                    skipped.append((entry.ref, entry.reason))
                    continue
                parts = PurePosixPath(entry.name).parts
                if len(parts) > 1 and not hidden(entry.name):
                    in_folders = True
                    folders.add(parts[0])
                reason = classify(entry.name)
                if reason is not None:
                    skipped.append((entry.name, reason))
                else:
                    files.append((entry.name, entry.url, parts[0] if len(parts) > 1 else None))
            self._db.executemany("INSERT INTO files VALUES (?, ?, ?)", files)
            self._db.executemany("INSERT INTO skipped VALUES (?, ?)", skipped)
        return {f for f in folders if not f.startswith(".")}, in_folders

    def _number(self, in_folders: bool) -> int:
        """Positions in name order (SQLite's BINARY order of UTF-8 is code point order,
        as Python sorts), labels from the class names; the rest becomes skipped."""
        db = self._db
        db.executemany(
            "INSERT INTO classes VALUES (?, ?)", [(n, i) for i, n in enumerate(self.class_names)]
        )
        if in_folders:
            db.execute(
                "INSERT INTO skipped SELECT ref, 'outside any class folder' FROM files "
                "WHERE folder IS NULL"
            )
            db.execute(
                "INSERT INTO inputs SELECT row_number() OVER (ORDER BY f.ref) - 1, f.ref, "
                "f.url, c.id FROM files f JOIN classes c ON c.name = f.folder"
            )
            db.execute(
                "INSERT INTO skipped SELECT name || '/', 'class folder holds no images' "
                "FROM classes WHERE id NOT IN (SELECT DISTINCT label FROM inputs)"
            )
        else:
            db.execute(
                "INSERT INTO inputs SELECT row_number() OVER (ORDER BY ref) - 1, ref, url, 0 "
                "FROM files"
            )
        db.execute("DELETE FROM files")
        db.commit()
        return db.execute("SELECT count(*) FROM inputs").fetchone()[0]

    def inputs_at(self, positions: Sequence[int]) -> list[Input]:
        found: dict[int, Input] = {}
        for start in range(0, len(positions), 500):  # SQLite's bound-parameter limit
            chunk = [int(p) for p in positions[start : start + 500]]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT pos, ref, url, label FROM inputs WHERE pos IN ({marks})", chunk
            )
            for pos, ref, url, label in rows:
                found[pos] = Input(ref=ref, label=label, url=url)
        return [found[int(p)] for p in positions]

    def pixels_at(self, positions: Sequence[int]) -> np.ndarray | None:
        return None

    def skipped(self) -> Iterator[Skipped]:
        rows = self._db.execute("SELECT ref, reason FROM skipped ORDER BY ref")
        while batch := rows.fetchmany(_BATCH):
            yield from (Skipped(ref, reason) for ref, reason in batch)

    def close(self) -> None:
        self._db.close()


def open_listing(spec: str, scratch: Path) -> ArrayListing | FolderListing:
    """List ``spec`` (``mnist``, an ``.npz``, an image folder; local or ``s3://``); a
    folder's listing lives in ``scratch`` until the caller removes it."""
    if is_array_source(spec):
        return ArrayListing(spec)
    check_folder(spec)
    return FolderListing(spec, scratch)
