"""Who writes the shards: threads of this process, or Ray tasks on a cluster.

Both take the plan's :class:`ShardTask` stream and give back :class:`ShardResult` in
plan order, with at most ``width`` shards being written and a bounded number of
finished results waiting for an earlier one, so memory stays flat however many
shards there are. Shard bytes do not depend on the engine: each shard is written
by :func:`data.shard_writer.write_shard` from its task alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from functools import partial
from typing import Any, Literal

from data.manifest import ShardOptions
from data.shard_writer import ShardResult, ShardTask, write_shard

Engine = Literal["threads", "ray"]
BUFFERED_PER_WORKER = 4  # finished results that may wait for a slower earlier shard


def write_shards(
    engine: Engine,
    tasks: Iterable[ShardTask],
    options: ShardOptions,
    out_url: str,
    replaces_manifest: bool,
    workers: int | None,
) -> Iterator[ShardResult]:
    """Every task's :class:`ShardResult`, in task order. ``workers``: threads, or Ray
    tasks at once (default: one per CPU of this machine, at most 8; on Ray, one per CPU
    of the cluster)."""
    write = partial(
        write_shard, options=options, out_url=out_url, replaces_manifest=replaces_manifest
    )
    if engine == "ray":
        return _on_ray(write, tasks, workers)
    return _on_threads(write, tasks, workers or min(8, os.cpu_count() or 1))


def _on_threads(
    write: Callable[..., ShardResult], tasks: Iterable[ShardTask], workers: int
) -> Iterator[ShardResult]:
    if workers <= 1:  # one shard at a time, nothing to overlap
        yield from (write(task) for task in tasks)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from _in_order(
            tasks,
            submit=lambda task: pool.submit(write, task),
            wait_any=lambda running: wait(running, return_when=FIRST_COMPLETED)[0],
            result=lambda future: future.result(),
            width=workers,
        )


def _on_ray(
    write: Callable[..., ShardResult], tasks: Iterable[ShardTask], workers: int | None
) -> Iterator[ShardResult]:
    import ray

    if not ray.is_initialized():
        raise RuntimeError("the ray engine needs a connected Ray session (connect_ray first)")
    width = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    # A task lost with its worker or node is run again (the shard is rewritten whole);
    # an error it raises is not retried: it names a problem the user must fix.
    remote = ray.remote(num_cpus=1, max_retries=3)(_run)
    return _in_order(
        tasks,
        submit=lambda task: remote.remote(write, task),
        wait_any=lambda running: ray.wait(list(running), num_returns=1)[0],
        result=ray.get,
        width=width,
    )


def _run(write: Callable[..., ShardResult], task: ShardTask) -> ShardResult:
    return write(task)


def _in_order(
    tasks: Iterable[ShardTask],
    submit: Callable[[ShardTask], Any],
    wait_any: Callable[[set[Any]], Iterable[Any]],
    result: Callable[[Any], ShardResult],
    width: int,
) -> Iterator[ShardResult]:
    """Keep ``width`` tasks running; yield results in task order. A finished result
    waits for earlier ones in a buffer of at most ``BUFFERED_PER_WORKER · width``; when
    it is full, nothing new starts until the earliest shard is done."""
    tasks = iter(tasks)
    running: dict[Any, int] = {}
    done: dict[int, ShardResult] = {}
    submitted = next_out = 0
    exhausted = False
    while True:
        while not exhausted and len(running) < width and len(done) < BUFFERED_PER_WORKER * width:
            task = next(tasks, None)
            if task is None:
                exhausted = True
                break
            running[submit(task)] = submitted
            submitted += 1
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1
        if not running:
            if exhausted:
                return
            continue
        for handle in wait_any(set(running)):
            done[running.pop(handle)] = result(handle)
