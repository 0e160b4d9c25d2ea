"""Where sharding runs: in this process, as Ray tasks on a cluster this process joins,
or as a Ray Job on a cluster reached through its dashboard (this machine never joins).

The same source and options give the same bytes in all three places; the choice is
about speed and about which machine may reach the source and the destination.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from data.manifest import Manifest, ShardOptions
from data.shard_engines import Engine


@dataclass(frozen=True)
class Sharded:
    """The dataset's manifest and the one-paragraph summary of what was done."""

    manifest: Manifest
    summary: str


def shard_where(
    source: str,
    out_url: str,
    options: ShardOptions,
    *,
    engine: Engine = "threads",
    ray_address: str | None = None,
    workers: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> Sharded:
    """Shard ``source`` into ``out_url`` with ``engine``. For ``ray``, ``ray_address``
    is joined (a GCS address, ``auto``; None: ``RAY_ADDRESS`` or a local Ray), or, when
    it is a dashboard URL, the command runs there as a Ray Job. Raises what
    :func:`data.shard.shard_dataset` raises, RayUnavailable for a cluster that does
    not answer, RuntimeError for a failed Ray Job."""
    from data.shard import check_locations, shard_dataset

    if engine == "ray":
        from training.ray.connection import connect_ray, is_job_address

        if is_job_address(ray_address):  # the cluster checks what it can reach
            return _as_ray_job(source, out_url, options, ray_address, workers, log)
        check_locations(source, out_url)  # before joining a cluster
        connect_ray(ray_address)
    report = shard_dataset(
        source, out_url, options, workers=workers, progress=progress, engine=engine
    )
    return Sharded(report.manifest, report.summary())


def _as_ray_job(
    source: str,
    out_url: str,
    options: ShardOptions,
    address: str,
    workers: int | None,
    log: Callable[[str], None],
) -> Sharded:
    """``ldm shard SOURCE OUT_URL --ray`` run by the cluster as a Ray Job (whose driver
    joins its own cluster through the RAY_ADDRESS that Ray sets for it)."""
    from data.manifest import load_manifest
    from training.ray.submit import run_ldm_job

    arguments = ["shard", source, out_url, "--no-progress"]
    for name, value in options.model_dump().items():
        arguments += [f"--{name.replace('_', '-')}", str(value)]
    if workers is not None:
        arguments += ["--workers", str(workers)]
    arguments.append("--ray")
    logs = run_ldm_job(address, arguments, log=log)
    manifest = load_manifest(out_url)
    written = [line for line in logs.splitlines() if line.startswith("Wrote ")]
    summary = written[-1] if written else f"Wrote {sum(manifest.counts.values()):,} samples"
    return Sharded(manifest, summary)
