"""``ldm up`` starts every service of the local stack; what a user does with them from
a shell that sourced ``env.sh`` works (``ldm shard`` to its S3, announced to its
Prefect server; a model registered in its MLflow; the endpoint deployed on its Ray
cluster through the Serve REST API and answering); ``ldm down`` leaves no process
behind and no record of its Ray head; and a second ``ldm up`` starts on the state the
first one left. (The retrain flow through a dashboard, as on this stack, is
test_retrain_flow's.)"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import psutil
import pytest

from flows.local_stack import ENV_FILE, Stack, stack_folder
from tests.integration.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LDM = [sys.executable, "-m", "flows.cli"]
OUTSIDE = ("AWS_", "MLFLOW_", "RAY_ADDRESS", "PREFECT_API_URL")


def _exports(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("export ")]
    return dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in lines)


def _family(pid: int) -> list[psutil.Process]:
    leader = psutil.Process(pid)
    return [leader, *leader.children(recursive=True)]


def _get(url: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_up_use_down_up_again_on_the_same_state(tmp_path):
    home = tmp_path / "home"
    ray_tmp = Path(tempfile.mkdtemp(prefix="ldmr", dir="/tmp"))  # short: Ray's sockets
    env = {k: v for k, v in os.environ.items() if not k.startswith(OUTSIDE)}
    env |= {
        "LDM_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "RAY_TMPDIR": str(ray_tmp),
    }
    folder, family = stack_folder(home), []
    try:
        up = subprocess.run(
            [*LDM, "up", "--with-prefect"], env=env, capture_output=True, text=True, timeout=600
        )
        assert up.returncode == 0, up.stdout + up.stderr
        stack = Stack.load(folder)
        names = [s.name for s in stack.services]
        assert names == ["s3", "mlflow", "ray-head", "ray-worker", "prefect"]
        assert [s.name for s in stack.running()] == names
        env_file = folder / ENV_FILE
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        exported = _exports(env_file)
        assert exported["RAY_ADDRESS"].startswith("http://127.0.0.1:")
        assert f"source {env_file}" in up.stdout
        assert exported["AWS_SECRET_ACCESS_KEY"] not in up.stdout  # the key stays in the file

        dashboard, prefect = exported["RAY_ADDRESS"], exported["PREFECT_API_URL"]
        shard = subprocess.run(
            [
                *LDM,
                "shard",
                "mnist",
                "s3://ldm/datasets/mnist",
                "--shard-max-samples",
                "1000",
                "--no-progress",
            ],
            env=env | exported,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert shard.returncode == 0, shard.stderr[-3000:]
        assert "announced to Prefect" in shard.stdout  # the stack's Prefect server took it
        port = free_port()
        used = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.integration.use_stack",
                exported["MLFLOW_TRACKING_URI"],
                dashboard,
                str(port),
            ],
            env=env | exported,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert used.returncode == 0, used.stdout[-3000:] + used.stderr[-5000:]
        assert "1 images from ldm version 1" in used.stdout
        apps = _get(f"{dashboard}/api/serve/applications/")["applications"]
        assert apps["ldm"]["status"] == "RUNNING" and apps["ldm"]["source"] == "declarative"
        events = _get(
            f"{prefect}/events/filter", {"filter": {"event": {"name": ["ldm.dataset.sharded"]}}}
        )
        assert events["events"][0]["payload"]["dataset_url"] == "s3://ldm/datasets/mnist"
        recorded_before = (ray_tmp / "ray" / "ray_current_cluster").read_text().strip()
        family = [p for s in stack.services for p in _family(s.pid)]
        assert len(family) > len(names)  # Ray's raylet, GCS, workers; gunicorn; …
    finally:
        down = subprocess.run([*LDM, "down"], env=env, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == "stopped: prefect, ray-worker, ray-head, mlflow, s3"
    left = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == []
    assert not (folder / ENV_FILE).exists()
    # The head had recorded itself for ray.init() to join (as IP:PORT of this node);
    # after down nothing is left there to trip over.
    assert recorded_before.endswith(":" + stack.services[3].url.rsplit(":", 1)[1])
    assert not (ray_tmp / "ray" / "ray_current_cluster").exists()
    again = subprocess.run([*LDM, "down"], env=env, capture_output=True, text=True, timeout=60)
    assert again.stdout.strip() == "no local stack is running"
    _up_again_on_the_same_state(env, folder, exported)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _up_again_on_the_same_state(env: dict, folder: Path, before: dict) -> None:
    """A second ``ldm up`` reuses the S3 key, the bucket and the MLflow database."""
    import boto3

    try:
        up = subprocess.run([*LDM, "up"], env=env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        exported = _exports(folder / ENV_FILE)
        assert exported["AWS_ACCESS_KEY_ID"] == before["AWS_ACCESS_KEY_ID"]
        tracking = exported["MLFLOW_TRACKING_URI"]
        model = _get(f"{tracking}/api/2.0/mlflow/registered-models/get?name=ldm")
        assert model["registered_model"]["latest_versions"][0]["version"] == "1"
        s3 = boto3.client(
            "s3",
            endpoint_url=exported["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id=exported["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=exported["AWS_SECRET_ACCESS_KEY"],
        )
        for prefix in ("mlflow/", "datasets/mnist/"):  # the model's artifacts, the shards
            assert s3.list_objects_v2(Bucket="ldm", Prefix=prefix)["KeyCount"] > 0, prefix
    finally:
        down = subprocess.run([*LDM, "down"], env=env, capture_output=True, text=True, timeout=300)
    assert down.stdout.strip() == "stopped: ray-worker, ray-head, mlflow, s3"
