"""Whether a Ray cluster can ever hold what a job asks for, before the job waits for it.

Ray waits for resources no node has in case the cluster grows: Serve keeps a replica
pending, and Ray Train retries the start of its worker group every minute for good. A
cluster that cannot grow never gives them, so the driver checks first: a local Ray
that this process started, and a cluster started with ``ray start`` and no autoscaling
config (Ray's read-only autoscaler: every node a type of its own, none to launch), fail
at once with what the nodes have and what to change.
"""

from __future__ import annotations

import json
import math
from typing import Any

import ray

from training.ray.connection import started_local_ray

AUTOSCALING_STATUS_KEY = b"__autoscaling_status"  # the monitor's report, as `ray status` reads it


class Unplaceable(ValueError):
    """No node of a cluster that cannot grow can hold a worker or replica: a setting to
    change, not a fault that retrying fixes."""


def placement_problem(
    need: dict[str, float],
    nodes: list[dict[str, Any]],
    count: int = 1,
    strategy: str = "PACK",
    what: str = "replica",
) -> str | None:
    """Why the alive nodes of a cluster (``ray.nodes()``), counted at their total
    resources, could never hold ``count`` bundles of ``need`` placed by ``strategy`` (a
    placement group's); None when they could."""
    alive = [n.get("Resources") or {} for n in nodes if n.get("Alive")]
    fits = [_bundles_that_fit(need, res) for res in alive]
    if strategy == "STRICT_PACK":
        room = max(fits, default=0)
    elif strategy == "STRICT_SPREAD":
        room = sum(1 for n in fits if n >= 1)
    else:
        room = sum(fits)
    if room >= count:
        return None
    asked = ", ".join(f"{v:g} {k}" for k, v in sorted(need.items()))
    have = "; ".join(", ".join(f"{res.get(k, 0):g} {k}" for k in sorted(need)) for res in alive)
    if count == 1:
        return f"a {what} needs {asked}; no node of the Ray cluster has that (its nodes: {have})"
    place = {"STRICT_PACK": " on one node", "STRICT_SPREAD": " on nodes of their own"}
    return (
        f"{count} {what}s need {asked} each{place.get(strategy, '')}; the Ray cluster holds "
        f"{room} (its nodes: {have})"
    )


def _bundles_that_fit(need: dict[str, float], resources: dict[str, float]) -> int:
    counts = [math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return min(counts) if counts else 1 << 30  # a bundle of nothing fits anywhere


def cluster_can_grow() -> bool:
    """Whether nodes may still join the connected cluster: False for a local Ray this
    process started and for one whose autoscaler is Ray's read-only one (``ray start``
    without an autoscaling config, as ``ldm up`` starts it); True when unknown."""
    if started_local_ray():
        return False
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(AUTOSCALING_STATUS_KEY)
        return autoscaler_adds_nodes(json.loads(raw) if raw else {})
    except Exception:  # another autoscaler, another format: assume it may add nodes
        return True


def autoscaler_adds_nodes(status: dict[str, Any]) -> bool:
    """False when Ray's autoscaling status (the monitor's report) is the read-only
    autoscaler's, whose node types are the nodes themselves (``node_<node id>``); True
    otherwise, and when it says nothing yet."""
    types = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return not types or any(kind != f"node_{node}" for node, kind in types.items())


def check_room(
    need: dict[str, float],
    count: int = 1,
    strategy: str = "PACK",
    what: str = "replica",
    hint: str = "",
    nodes: list[dict[str, Any]] | None = None,
) -> str | None:
    """Why the connected cluster's nodes (``nodes``, default ``ray.nodes()``) cannot hold
    ``count`` bundles of ``need`` now, or None when they can. :class:`Unplaceable` (the
    reason, then ``hint``) when the cluster cannot grow either; a cluster that may grow
    is left to add nodes for the demand, which its autoscaler only sees once the job
    asks."""
    nodes = ray.nodes() if nodes is None else nodes
    problem = placement_problem(need, nodes, count, strategy, what)
    if problem is not None and not cluster_can_grow():
        raise Unplaceable(f"{problem}; this cluster adds no nodes{f'; {hint}' if hint else ''}")
    return problem
