"""Listing a large S3 prefix: its first-level folders listed at once, page by page.

One ``ListObjectsV2`` stream gives about 10–20 thousand keys a second (1,000 keys a
page, one page at a time), which is hours for a hundred million keys. S3 serves
different prefixes independently, so a source laid out in folders (class folders)
is listed with one stream per folder, :data:`LIST_THREADS` at a time. Keys come back
in no particular order (the listing spill sorts them); memory holds at most a few
pages per stream.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from data import storage

LIST_THREADS = 16
_DONE = object()


def list_tree(url: str, threads: int = LIST_THREADS) -> Iterator[storage.Listed]:
    """Every object under ``s3://bucket/prefix``, recursively, in no fixed order."""
    loc = storage.parse(url)
    root = loc.key + "/" if loc.key else ""
    folders: list[str] = []
    for page in storage.s3_pages(url, root, delimiter="/"):
        folders += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        yield from storage.listed_in(url, root, page)
    if not folders:
        return
    pages: queue.Queue = queue.Queue(maxsize=4 * threads)
    stop = threading.Event()

    def list_folder(prefix: str) -> None:
        try:
            for page in storage.s3_pages(url, prefix):
                if stop.is_set():
                    return
                pages.put(list(storage.listed_in(url, root, page)))
        except BaseException as error:  # handed to the reading thread, which raises it
            pages.put(error)
        finally:
            pages.put(_DONE)

    remaining = len(folders)
    with ThreadPoolExecutor(min(threads, len(folders))) as pool:
        for prefix in folders:
            pool.submit(list_folder, prefix)
        try:
            while remaining:
                item = pages.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield from item
        finally:  # an error, or a reader that stopped early: let every stream end
            stop.set()
            while remaining:
                if pages.get() is _DONE:
                    remaining -= 1
