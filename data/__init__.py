"""Datasets: sources, WebDataset sharding, manifests, storage and the shard reader.

The public entry points, importable from ``data`` (loaded on first use, so importing
``data.mnist`` alone stays light):

- :func:`shard_dataset` (``data.shard``): a source → shards + ``manifest.json``;
- :func:`build_loader` (``data.reader``): a manifest → batches for one rank;
- :func:`load_manifest`, :class:`Manifest`, :class:`ShardOptions` (``data.manifest``);
- :class:`StorageError` (``data.storage``): storage problems a user can fix.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "shard_dataset": "data.shard",
    "ShardReport": "data.shard",
    "build_loader": "data.reader",
    "ShardLoader": "data.reader",
    "load_manifest": "data.manifest",
    "Manifest": "data.manifest",
    "ShardOptions": "data.manifest",
    "StorageError": "data.storage",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
