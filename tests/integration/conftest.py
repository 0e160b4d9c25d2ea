"""Real local services for integration tests.

``s3_server``: one SeaweedFS ``weed mini`` per test session on 127.0.0.1 with free
ports, stopped by PID (SIGTERM, then SIGKILL). ``s3_env`` points boto3 at it for one
test through the standard AWS environment variables and gives a fresh bucket.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "ldm-test-key"
SECRET_KEY = "ldm-test-secret"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    pid: int


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file():
        return str(candidate)
    pytest.fail("SeaweedFS 'weed' binary not found next to the Python interpreter: run make test")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """HTTP ports whose gRPC twin (port + 10000) is free too; below 55536 for that."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 45000)
        if port not in ports and _port_free(port) and _port_free(port + 10000):
            ports.append(port)
    return ports


def _wait_ready(endpoint: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            client.list_buckets()
            return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(
        f"SeaweedFS did not answer at {endpoint} within {timeout:.0f} s "
        f"(exit code {process.poll()}); its log:\n{log.read_text()[-4000:]}"
    )


def _stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    weed = _weed_binary()
    folder = tmp_path_factory.mktemp("seaweedfs")
    master, volume, filer, s3, admin = _free_ports(5)
    command = [
        weed, f"-logdir={folder}", "mini", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        f"-s3.port={s3}", f"-admin.port={admin}", "-webdav=false", "-admin.ui=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
    ]  # fmt: skip
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log = folder / "weed.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=folder
        )
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        _wait_ready(endpoint, process, log, timeout=30)
        yield S3Server(endpoint, ACCESS_KEY, SECRET_KEY, process.pid)
    finally:
        _stop(process)
        _remove_sockets([master, volume, filer, s3, admin])


def _remove_sockets(ports: list[int]) -> None:
    """Unix sockets weed leaves in /tmp, named after a port or its gRPC twin (+10000)."""
    for port in ports:
        for name in (port, port + 10000):
            for path in Path("/tmp").glob(f"seaweedfs-*-{name}.sock"):
                path.unlink(missing_ok=True)


@dataclass(frozen=True)
class S3Env:
    """The server plus a fresh, empty bucket for one test."""

    server: S3Server
    bucket: str

    def client(self):  # -> a boto3 S3 client with the test credentials
        import boto3

        return boto3.client("s3", region_name=REGION)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Env:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    env = S3Env(s3_server, f"test-{uuid.uuid4().hex[:12]}")
    env.client().create_bucket(Bucket=env.bucket)
    return env


# ---------------------------------------------------------------- training services
# The Ray cluster's processes inherit the environment they start with, so the S3
# endpoint and credentials are set for the whole session before it starts.

SESSION_BUCKETS = ("ldm-data", "ldm-runs", "ldm-mlflow")


@pytest.fixture(scope="session")
def s3_session(s3_server: S3Server) -> Iterator[S3Server]:
    """The S3 server as this process's default AWS endpoint, with the session buckets."""
    import boto3

    values = {
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": REGION,
        "RAY_AUTH_MODE": "disabled",
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    client = boto3.client("s3", region_name=REGION)
    for bucket in SESSION_BUCKETS:
        client.create_bucket(Bucket=bucket)
    yield s3_server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def mnist_url(s3_session: S3Server) -> str:
    """The built-in MNIST digits sharded to the S3 server (1 channel, shards of 600)."""
    from data.manifest import ShardOptions
    from data.shard import shard_dataset

    url = "s3://ldm-data/mnist-32"
    shard_dataset("mnist", url, ShardOptions(channels=1, shard_max_samples=600), progress=False)
    return url


@pytest.fixture(scope="session")
def mlflow_server(s3_session: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` (sqlite backend, artifacts on the S3 server); its URI."""
    from tests.integration.services import start_mlflow_server, stop_process_group

    folder = tmp_path_factory.mktemp("mlflow")
    process, uri = start_mlflow_server(folder, "s3://ldm-mlflow/artifacts", s3_session.endpoint)
    try:
        yield uri
    finally:
        stop_process_group(process)


@dataclass(frozen=True)
class RayTestCluster:
    address: str  # GCS address, joined in-process
    dashboard_url: str  # Ray Jobs and the Serve REST API


@pytest.fixture(scope="session")
def ray_cluster(s3_session: S3Server) -> Iterator[RayTestCluster]:
    """One Ray cluster of two nodes (2 CPUs each) on this machine, shared by the session,
    with its dashboard on 127.0.0.1. Its processes find this interpreter's ``python``
    first on PATH, as the nodes of a cluster image do, so Ray Jobs can run the package."""
    import ray
    from ray.cluster_utils import Cluster

    from tests.integration.services import free_port

    saved_path = os.environ["PATH"]
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{saved_path}"
    port = free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": port,
        },
    )
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    try:
        yield RayTestCluster(cluster.address, f"http://127.0.0.1:{port}")
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ["PATH"] = saved_path
