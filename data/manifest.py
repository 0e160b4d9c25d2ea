"""The manifest: what a sharded dataset holds. Written last; a dataset exists only once
its ``manifest.json`` does. Readers check shards against it (count, bytes, sha256)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from data import storage
from data.frozen import FrozenConfig

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
Split = Literal["train", "val"]
Kind = Literal["images", "latents"]
SPLITS: tuple[Split, ...] = ("train", "val")
# The only names a shard can have: a plain file name in the dataset's own folder.
SHARD_NAME = re.compile(r"^(?P<split>train|val)-[0-9]{6,}\.tar$")


class ShardOptions(FrozenConfig):
    """What decides a dataset's content (all of it goes into the fingerprint)."""

    image_size: int = Field(32, ge=8, le=4096, description="images are size×size pixels")
    channels: Literal[1, 3] = Field(3, description="1: grayscale (L), 3: RGB")
    shard_max_samples: int = Field(1000, ge=1, description="samples per shard, at most")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of inputs for 'val'")
    seed: int = Field(0, ge=0, description="seed of the train/val split and sample order")
    max_image_pixels: int = Field(
        89_478_485,
        ge=1,
        le=178_956_970,
        description="larger inputs are skipped as too large without being decoded "
        "(default: Pillow's limit; at most twice it)",
    )


class ShardEntry(FrozenConfig):
    """One tar file of the dataset, relative to the manifest's folder."""

    name: str
    split: Split
    num_samples: int = Field(ge=1)
    num_bytes: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _own_shard(self) -> ShardEntry:
        """A name is used as a path inside the dataset's folder: nothing else passes."""
        match = SHARD_NAME.match(self.name)
        if match is None or match["split"] != self.split:
            raise ValueError(
                f"manifest entry {self.name!r} ({self.split}) is not a shard of this dataset "
                f"(expected {self.split}-NNNNNN.tar in the manifest's own folder): the "
                "manifest is damaged or was edited; re-run 'ldm shard'"
            )
        return self


class SkippedInput(FrozenConfig):
    """An input of the source that is not in the dataset, and why."""

    input: str
    reason: str


class Manifest(FrozenConfig):
    """Everything a reader needs: image format, classes, splits and every shard."""

    format_version: Literal[1] = FORMAT_VERSION
    # images: PNG samples uint8 [S, S, C]; latents: npy samples float32 [C, S, S]
    # written by the training job's latent cache.
    kind: Kind = "images"
    image_size: int
    channels: int = Field(ge=1)
    class_names: tuple[str, ...] = Field(description="empty: unconditional, every label is 0")
    counts: dict[Split, int] = Field(description="samples per split")
    shards: tuple[ShardEntry, ...]
    source: str
    options: ShardOptions | None = Field(None, description="how images were sharded")
    fingerprint: str = Field(description="sha256 over the source's content and the options")
    skipped: tuple[SkippedInput, ...] = ()

    @model_validator(mode="after")
    def _counts_match_shards(self) -> Manifest:
        if self.kind == "images" and (self.channels not in (1, 3) or self.options is None):
            raise ValueError("an image manifest needs 1 or 3 channels and its shard options")
        for split in SPLITS:
            listed = sum(s.num_samples for s in self.shards if s.split == split)
            if listed != self.counts.get(split, 0):
                raise ValueError(
                    f"manifest says {self.counts.get(split, 0)} {split} samples but its "
                    f"{split} shards hold {listed}; the manifest is damaged, re-run 'ldm shard'"
                )
        if len({s.name for s in self.shards}) != len(self.shards):
            raise ValueError("manifest lists a shard twice; re-run 'ldm shard'")
        return self

    @property
    def num_classes(self) -> int:
        """Classes a conditional model needs (1 for an unconditional dataset)."""
        return max(1, len(self.class_names))

    def split_shards(self, split: Split) -> tuple[ShardEntry, ...]:
        """The shards of one split, in writing order."""
        return tuple(s for s in self.shards if s.split == split)

    def to_json(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode("utf-8")


def manifest_url(url: str) -> str:
    """Accept a dataset folder or its manifest: → the ``manifest.json`` URL."""
    return url if url.endswith(".json") else storage.join(url, MANIFEST_NAME)


def load_manifest(url: str) -> Manifest:
    """Read and validate a manifest from a dataset folder/prefix or a manifest URL."""
    url = manifest_url(url)
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no manifest at {url}: the dataset does not exist or its sharding did not "
            "finish; run 'ldm shard' to (re)build it"
        ) from error
    return Manifest.model_validate_json(data)
