"""Deploy or update the sampling app on a Ray cluster, and say where it answers.

Two ways, picked by the address:
- a dashboard URL (``http://head:8265``): a config-file deploy through the Serve REST
  API, the same as ``serve deploy``. The orchestrator never joins the cluster; other
  declaratively deployed apps are kept; changed ``args`` roll the replicas.
- a GCS address, ``auto`` or nothing: join the cluster (or start a local Ray) and
  ``serve.run`` from this process.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlparse

from data.environment import settings_env
from serving.config import AppConfig
from training.ray.submit import LOCAL_HOSTS, is_job_address

APPLICATIONS = "/api/serve/applications/"
IMPORT_PATH = "serving.app:build_app"


class DeployError(RuntimeError):
    """The app did not reach RUNNING; the message carries Serve's own reason."""


def deploy_app(
    config: AppConfig,
    name: str,
    port: int,
    address: str | None = None,
    timeout_s: float = 300.0,
    host: str = "127.0.0.1",
) -> str:
    """Deploy ``config`` as application ``name`` on route ``/``, its HTTP proxy bound to
    ``host`` (this machine only unless told otherwise); returns its base URL."""
    if is_job_address(address):
        return deploy_through_dashboard(config, name, address, port, timeout_s, host)
    from ray import serve

    from serving.app import build_app
    from training.ray.connection import connect_ray

    connect_ray(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name=name, route_prefix="/")
    return f"http://{_reachable(host, '127.0.0.1')}:{port}"


def _reachable(bind: str, machine: str) -> str:
    """The address to call an HTTP proxy bound to ``bind`` on ``machine``."""
    return machine if bind in ("0.0.0.0", "::", "127.0.0.1", "localhost") else bind


def application_entry(config: AppConfig, name: str) -> dict[str, Any]:
    """One entry of a Serve config file's ``applications`` for the sampling app."""
    entry: dict[str, Any] = {
        "name": name,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": config.model_dump(mode="json", exclude_none=True),
    }
    env = settings_env()  # where S3 is; never credentials: replicas use their nodes'
    if env:
        entry["runtime_env"] = {"env_vars": env}
    return entry


def deploy_through_dashboard(
    config: AppConfig,
    name: str,
    address: str,
    port: int,
    timeout_s: float = 300.0,
    bind: str = "127.0.0.1",
) -> str:
    """PUT the cluster's Serve config with this app added or replaced, then wait until
    Serve reports it RUNNING with these args."""
    base = address.rstrip("/")
    host = urlparse(base).hostname or "127.0.0.1"
    if host not in LOCAL_HOSTS and bind in ("127.0.0.1", "localhost"):
        raise ValueError(
            f"the Ray cluster at {address} is on another machine and the endpoint would "
            "bind 127.0.0.1 there, out of reach from here: give a bind host (serve_host / "
            "--host 0.0.0.0, behind your proxy or firewall; see 'Security and limits')"
        )
    current = _call("GET", base + APPLICATIONS)
    kept = [
        details["deployed_app_config"]
        for app, details in (current.get("applications") or {}).items()
        if app != name
        and details.get("source") == "declarative"
        and details.get("deployed_app_config")
    ]
    entry = application_entry(config, name)
    body = {"http_options": {"host": bind, "port": port}, "applications": [*kept, entry]}
    _call("PUT", base + APPLICATIONS, body)

    deadline = time.monotonic() + timeout_s
    while True:
        details = _call("GET", base + APPLICATIONS)
        app = (details.get("applications") or {}).get(name) or {}
        deployed = (app.get("deployed_app_config") or {}).get("args")
        if app.get("status") == "RUNNING" and deployed == entry["args"]:
            served_port = (details.get("http_options") or {}).get("port") or port
            return f"http://{_reachable(bind, host)}:{served_port}"
        if app.get("status") == "DEPLOY_FAILED" and deployed == entry["args"]:
            raise DeployError(f"Serve could not deploy '{name}': {app.get('message', '')}")
        if time.monotonic() > deadline:
            raise DeployError(
                f"'{name}' was not RUNNING {timeout_s:.0f} s after the deploy "
                f"(status {app.get('status')}: {app.get('message', '')})"
            )
        time.sleep(1.0)


def _call(method: str, url: str, body: dict | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read().decode() or "{}"
    except urllib.error.HTTPError as error:
        reason = error.read().decode(errors="replace")[-2000:]
        raise DeployError(f"{method} {url} answered {error.code}: {reason}") from error
    except urllib.error.URLError as error:
        raise DeployError(f"no Ray dashboard answered at {url}: {error.reason}") from error
    return json.loads(text)
