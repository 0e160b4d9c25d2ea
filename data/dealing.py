"""Which shards each rank of a distributed job reads in an epoch.

Two ways, chosen per training stage (``StageConfig.shard_sampling``):

- ``partitioned`` (the default): every shard is read once per epoch, by one rank;
  whole shards are dealt so that ranks hold about the same number of samples. Needs
  at least as many shards as ranks.
- ``resampled``: each rank draws shards with replacement (as webdataset's
  ``ResampledShards``), seeded by seed, epoch and rank, until it holds its share of
  the split (total samples // ranks). Any number of shards feeds any number of ranks,
  and a dataset that grows between epochs is drawn from as it is when the epoch
  starts; a shard may be read twice in an epoch and another not at all.

Both are computed from the manifest alone, so ranks need not talk to each other, and
both give every rank the same number of batches.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from data.manifest import ShardEntry

ShardSampling = Literal["partitioned", "resampled"]


def assign_shards(
    shards: Sequence[ShardEntry], world_size: int, seed: int, epoch: int
) -> list[list[ShardEntry]]:
    """Deal whole shards to ranks: a seeded shuffle, then largest first to the rank with
    the fewest samples so far (ties: lowest rank). Returns one disjoint list per rank, in
    the order that rank reads them."""
    rng = random.Random(f"assign/{seed}/{epoch}")
    order = list(shards)
    rng.shuffle(order)
    order.sort(key=lambda s: -s.num_samples)  # stable: equal sizes keep the shuffled order
    ranks: list[list[ShardEntry]] = [[] for _ in range(world_size)]
    totals = [0] * world_size
    for shard in order:
        r = min(range(world_size), key=lambda i: (totals[i], i))
        ranks[r].append(shard)
        totals[r] += shard.num_samples
    for assigned in ranks:
        rng.shuffle(assigned)
    return ranks


def draw_shards(
    shards: Sequence[ShardEntry], samples: int, seed: int, epoch: int, rank: int
) -> list[ShardEntry]:
    """Shards drawn with replacement, in reading order, until they hold ``samples``."""
    if not shards:
        raise ValueError("there are no shards to draw from")
    rng = random.Random(f"resample/{seed}/{epoch}/{rank}")
    drawn: list[ShardEntry] = []
    held = 0
    while held < samples:
        shard = rng.choice(shards)
        drawn.append(shard)
        held += shard.num_samples
    return drawn
