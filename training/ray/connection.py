"""Joining a Ray cluster, or starting a local one, without ever hanging.

``ray.init()`` with no address joins the cluster named in Ray's address file
(``ray_current_cluster`` in Ray's temp folder), which a killed or crashed head
leaves behind; against a dead GCS it then waits for good, and it replaces the
driver's SIGTERM handler. So before Ray is asked to connect, the address is
checked here: a cluster that does not answer within the timeout is a
:class:`RayUnavailable` error naming the address, a stale address file is
ignored (a new local Ray starts), and the caller's SIGTERM handler is put back
once Ray is up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

import ray

from data.environment import settings_env

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0
STALE_CHECK_S = 3.0  # an address file whose cluster does not answer this fast is stale
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in a submitted job's driver
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # read by Ray Train's driver


def is_job_address(address: str | None) -> bool:
    """A Ray dashboard URL (``http://head:8265``): submit a Ray Job instead of joining."""
    return bool(address) and address.startswith(("http://", "https://"))


_started_here = False  # whether this process's Ray is a local one connect_ray started


def started_local_ray() -> bool:
    """Whether this process is connected to a local Ray that :func:`connect_ray` started:
    a cluster of this machine alone, to which no node will be added."""
    return _started_here and ray.is_initialized()


class RayUnavailable(RuntimeError):
    """No Ray cluster answers at the address; the message says which and what to do."""


def connect_ray(address: str | None = None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Join the cluster at ``address`` (default ``RAY_ADDRESS``; ``auto``: the one
    running on this machine), or start a local Ray, unless already connected.

    A joined cluster's workers get the S3 settings of this process (endpoint and
    region), never its credentials: a local Ray inherits this environment, remote
    nodes use their own. A submitted Ray Job's driver passes nothing: the job's
    runtime env applies.
    """
    global _started_here
    if ray.is_initialized():
        return
    target = resolve_address(address, timeout_s)
    handler = signal.getsignal(signal.SIGTERM)
    if target is None:
        # A local Ray gets its dashboard on 127.0.0.1 (8265, or a free port): Ray
        # Train watches its controller through the state API the dashboard serves.
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")
        # One machine has no node a cloud drains: Ray Train's preemption watcher has
        # nothing to watch (its actor logs an error line at every start on this Ray
        # version). Clusters keep it; a value in the environment is kept.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    else:
        env = {} if JOB_CONFIG_ENV in os.environ else settings_env()
        ray.init(address=target, runtime_env={"env_vars": env} if env else None)
    _started_here = target is None
    _restore_sigterm(handler)


def resolve_address(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """The cluster address to join, after checking that it answers; None: start a
    local Ray. Raises :class:`RayUnavailable` when the named cluster does not answer."""
    given = address or os.environ.get("RAY_ADDRESS") or None
    if given == "local":
        return None
    if given is not None and given.startswith(("http://", "https://")):
        raise ValueError(
            f"{given} is a Ray dashboard URL: it takes Ray Jobs and Serve deploys, not a "
            "driver; give the GCS address (HOST:6379) or ray://HOST:10001 to join the cluster"
        )
    if given is not None and given != "auto":
        if not answers(given, timeout_s):
            raise RayUnavailable(
                f"no Ray cluster answers at {given} (waited {timeout_s:.0f} s): start it "
                "('ldm up' or 'ray start --head'), or fix RAY_ADDRESS / --ray-address; "
                "unset it to start a local Ray"
            )
        return given
    recorded = _address_file()
    if recorded and answers(recorded, STALE_CHECK_S):
        return recorded
    if given == "auto":
        raise RayUnavailable(
            "address 'auto': no running Ray cluster found on this machine"
            + (f" (the recorded {recorded} does not answer)" if recorded else "")
        )
    if recorded:
        logger.warning(
            "Ray's address file names %s, which does not answer (a stopped or crashed "
            "cluster); starting a new local Ray instead",
            recorded,
        )
    return None


def answers(address: str, timeout_s: float) -> bool:
    """Whether a gRPC server (a GCS or a Ray client server) accepts connections at
    ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``) within ``timeout_s``."""
    import grpc

    candidates = _dialled(address)
    deadline = time.monotonic() + timeout_s
    while True:
        for candidate in candidates:
            left = deadline - time.monotonic()
            channel = grpc.insecure_channel(candidate)
            try:
                grpc.channel_ready_future(channel).result(timeout=max(0.1, min(1.0, left)))
                return True
            except grpc.FutureTimeoutError:
                pass
            finally:
                channel.close()
        if time.monotonic() >= deadline:
            return False


def _dialled(address: str) -> list[str]:
    """The ``HOST:PORT`` forms Ray may use for ``address``: it dials the node's own IP
    for ``localhost`` and ``127.0.0.1`` (and records that form in its address file)."""
    hostport = address.removeprefix("ray://").rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not HOST:PORT or ray://HOST:PORT")
    if host in ("localhost", "127.0.0.1"):
        return [hostport, f"{ray.util.get_node_ip_address()}:{port}"]
    return [hostport]


def _address_file() -> str | None:
    """The GCS address Ray recorded for ``ray.init()`` to join, if any."""
    from ray._common.utils import get_ray_address_file  # no public API names this file

    try:
        with open(get_ray_address_file(None)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def forget_address(gcs_address: str) -> None:
    """Remove Ray's address file if it names ``gcs_address``, in any form Ray writes it
    (a cluster just stopped)."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    if _address_file() in _dialled(gcs_address):
        with contextlib.suppress(OSError):
            os.remove(path)


def _restore_sigterm(handler: object) -> None:
    """``ray.init`` installs its own SIGTERM handler; the caller's comes back."""
    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGTERM, handler)  # type: ignore[arg-type]
