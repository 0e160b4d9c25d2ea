"""Real local services for integration tests.

``s3_server``: one SeaweedFS ``weed mini`` per test session on 127.0.0.1 with free
ports, stopped by PID (SIGTERM, then SIGKILL). ``s3_env`` points boto3 at it for one
test through the standard AWS environment variables and gives a fresh bucket.
"""

from __future__ import annotations

import os
import sys
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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """``weed mini`` as ``ldm up`` starts it, with the test key; stopped by PID."""
    from flows.local_stack import start_s3, stop_service

    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "weed").is_file():
        pytest.fail(
            "SeaweedFS 'weed' binary not found next to the Python interpreter: run make test"
        )
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    service = start_s3(tmp_path_factory.mktemp("seaweedfs"), env, str(bin_dir))
    try:
        yield S3Server(service.url, ACCESS_KEY, SECRET_KEY, service.pid)
    finally:
        stop_service(service)


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


class MlflowProcess:
    """A real ``mlflow server`` (sqlite backend, artifacts on the S3 server) that a test
    may stop and start again on the same port and database."""

    def __init__(self, folder: Path, endpoint: str):
        self.folder, self.endpoint = folder, endpoint
        self.service = None
        self.start()

    def start(self) -> None:
        from flows.local_stack import spawn_mlflow

        env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}
        port = self.service.ports[0] if self.service else None
        self.service = spawn_mlflow(
            self.folder,
            env,
            str(Path(sys.executable).parent),
            artifacts="s3://ldm-mlflow/artifacts",
            port=port,
        ).wait()

    def stop(self) -> None:
        from flows.local_stack import stop_service

        stop_service(self.service)

    @property
    def url(self) -> str:
        return self.service.url


@pytest.fixture(scope="session")
def mlflow_process(s3_session: S3Server, tmp_path_factory) -> Iterator[MlflowProcess]:
    process = MlflowProcess(tmp_path_factory.mktemp("mlflow"), s3_session.endpoint)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_process: MlflowProcess) -> str:
    """The URI of the session's ``mlflow server``."""
    return mlflow_process.url


@dataclass(frozen=True)
class RayTestCluster:
    address: str  # GCS address, joined in-process
    dashboard_url: str  # Ray Jobs and the Serve REST API
    session_dir: str  # the cluster's logs, among others
    metrics_urls: tuple[str, ...]  # each node's Prometheus endpoint


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
        session = cluster.head_node.get_session_dir_path()
        metrics = tuple(
            f"http://127.0.0.1:{node.metrics_export_port}/metrics"
            for node in cluster.list_all_nodes()
        )
        yield RayTestCluster(cluster.address, f"http://127.0.0.1:{port}", session, metrics)
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ["PATH"] = saved_path
