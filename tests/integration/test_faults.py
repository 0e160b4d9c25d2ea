"""Faults of the services the pipeline depends on, injected for real: a stale Ray
address and Ctrl-C mid-retrain, an S3 server stopped mid-shard, a training Ray Job that
outlives its deadline, an ``ldm up`` that fails half-way. (The tracking server stopped
mid-run is in test_training, the endpoint's refusals in test_serving.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from data import storage
from data.manifest import ShardOptions, manifest_url
from data.shard import shard_dataset
from flows import local_stack as stack
from tests.integration.conftest import ACCESS_KEY, REGION, SECRET_KEY
from tests.integration.services import free_port

pytestmark = [pytest.mark.integration]

BIN = str(Path(sys.executable).parent)


def _ray_tmp() -> Path:
    """A Ray temp folder of the test's own (short: Ray puts its sockets there)."""
    folder = Path(tempfile.mkdtemp(prefix="ldmr", dir="/tmp"))
    (folder / "ray").mkdir()
    return folder


def _processes_using(path: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if str(path) in " ".join(process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_ctrl_c_during_a_retrain_on_a_stale_ray_address_exits_130_and_leaves_nothing(
    tmp_path,
):
    """What ``ldm down`` (or a crashed head) used to leave: Ray's address file naming a
    dead cluster. ``ldm retrain`` starts a local Ray instead, and a Ctrl-C in the
    terminal (SIGINT to the whole foreground process group) ends the flow, its Ray and
    its Prefect server."""
    ray_tmp = _ray_tmp()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_ADDRESS", "MLFLOW_", "PREFECT_API"))
    }
    env |= {"RAY_TMPDIR": str(ray_tmp), "LDM_HOME": str(tmp_path / "home")}
    log = tmp_path / "retrain.log"
    command = [sys.executable, "-m", "flows.cli", "retrain", "--preset", "tiny", "--no-serve"]
    with open(log, "wb") as out:  # a session of its own, as a terminal's foreground job
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        while "Started a local Ray instance" not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "ldm retrain hung:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        assert "which does not answer" in log.read_text()
        time.sleep(5)  # into the first stage
        leader = psutil.Process(process.pid)
        family = [leader, *leader.children(recursive=True)]
        assert any("prefect" in " ".join(p.cmdline()) for p in family)
        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(90)
    finally:
        if process.poll() is None:  # its Prefect server is in a session of its own
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            os.killpg(process.pid, signal.SIGKILL)
    assert code == 130, log.read_text()[-3000:]
    assert "ldm retrain: interrupted" in log.read_text()
    deadline = time.monotonic() + 30
    while _running(family) and time.monotonic() < deadline:
        time.sleep(1)
    assert _running(family) == []  # its Ray and its Prefect server went with it
    assert _processes_using(ray_tmp) == []
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_retrain_on_data_too_small_for_its_workers_fails_at_once_saying_what_to_change(
    tmp_path,
):
    """The train task's ValueError is not retried, and the console shows it as the
    command's error, not under Prefect's tracebacks of the task and the flows."""
    import numpy as np

    images = np.random.default_rng(0).integers(0, 256, (60, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "small.npz", images=images, labels=np.arange(60) % 3)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_ADDRESS", "MLFLOW_", "PREFECT_API"))
    }
    env["LDM_HOME"] = str(tmp_path / "home")
    options = f"--source {tmp_path / 'small.npz'} --image-size 16 --preset tiny --workers 2"
    command = [sys.executable, "-m", "flows.cli", "retrain", *options.split(), "--no-serve"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert (
        done.stderr.rstrip()
        .splitlines()[-1]
        .startswith(
            "ldm retrain: error: the autoencoder stage cannot start on 2 worker(s): the train "
            "split has 1 shards, fewer than the 2 ranks reading it"
        )
    )
    assert "Traceback" not in output and "Retry" not in output
    assert output.count("Task run 'train-") == 1  # failed once, not retried


def _running(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def own_s3(tmp_path, monkeypatch):
    """A SeaweedFS server of this test alone, which the test may stop and restart."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    servers = [stack.start_s3(tmp_path, env, BIN)]
    for name, value in {
        "AWS_ENDPOINT_URL": servers[0].url,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_MAX_ATTEMPTS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)

    def restart():
        servers.append(stack.start_s3(tmp_path, env, BIN, ports=servers[0].ports))

    yield servers, restart
    for server in servers:
        stack.stop_service(server)


def test_s3_stopped_mid_shard_publishes_nothing_and_a_rerun_sends_only_the_rest(
    own_s3, monkeypatch
):
    servers, restart = own_s3
    url, options = "s3://ldm/mnist", ShardOptions(channels=1, shard_max_samples=500)
    real_put, sent, lock = storage.put_file, [], threading.Lock()

    def put_then_stop_the_server(local, target, metadata=None):
        real_put(local, target, metadata)
        with lock:  # shards are sent from several threads at once
            sent.append(target.rsplit("/", 1)[1])
            if len(sent) == 3:
                stack.stop_service(servers[0])

    monkeypatch.setattr(storage, "put_file", put_then_stop_the_server)
    with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint"):
        shard_dataset("mnist", url, options, progress=False)
    restart()  # same folder, same ports: the shards sent before the stop are still there
    assert storage.stat(manifest_url(url)) is None  # no half-written dataset was published
    monkeypatch.setattr(storage, "put_file", real_put)
    report = shard_dataset("mnist", url, options, progress=False)
    assert len(sent) >= 3 and set(report.reused) == set(sent)  # none of them sent again
    assert len(report.uploaded) == len(report.manifest.shards) - len(sent)
    assert sum(report.manifest.counts.values()) == 5000


def test_the_s3_server_of_a_stack_restarts_on_its_data(tmp_path):
    """The bucket exists already on the second start (SeaweedFS says
    BucketAlreadyExists): the server comes up and the objects are still there."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    first = stack.start_s3(tmp_path, env, BIN)
    import boto3

    def client(server):
        return boto3.client(
            "s3",
            endpoint_url=server.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    try:
        client(first).put_object(Bucket=stack.BUCKET, Key="kept.txt", Body=b"still here")
    finally:
        stack.stop_service(first)
    second = stack.start_s3(tmp_path, env, BIN)  # new ports, same data folder
    try:
        body = client(second).get_object(Bucket=stack.BUCKET, Key="kept.txt")["Body"].read()
        assert body == b"still here"
    finally:
        stack.stop_service(second)


def test_a_failed_ldm_up_stops_whatever_it_started(tmp_path):
    folder = stack.stack_folder(tmp_path).resolve()
    (folder / "mlflow.log").mkdir(parents=True)  # MLflow's log cannot be opened: it fails
    with pytest.raises(IsADirectoryError, match="mlflow.log"):
        stack.up(tmp_path, log=lambda line: None)
    recorded = stack.Stack.load(folder)
    assert [s.name for s in recorded.services] == ["s3"]  # it had started S3 ...
    assert recorded.running() == []  # ... and stopped it again
    assert _processes_using(folder) == []  # weed, mlflow and their children are gone


def test_a_training_job_of_a_running_run_is_awaited_not_duplicated_and_stopped_at_the_deadline(
    ray_cluster, mlflow_server
):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from training.job import TrainJobConfig
    from training.presets import get_preset
    from training.ray.submit import RESULT_URL_KEY, RUN_NAME_KEY, submit_training

    client = JobSubmissionClient(ray_cluster.dashboard_url)
    first = client.submit_job(
        entrypoint="sleep 300",  # stands in for a training driver still at work
        metadata={RUN_NAME_KEY: "it-busy", RESULT_URL_KEY: "s3://ldm-runs/it-busy/result.json"},
    )
    job = TrainJobConfig(
        data_url="s3://ldm-data/mnist-32",
        model=get_preset("tiny"),
        run_name="it-busy",
        storage_url="s3://ldm-runs/jobs",
        tracking_uri=mlflow_server,
        job_timeout_s=4,
    )
    said: list[str] = []
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="still .* at the deadline"):
        submit_training(job, ray_cluster.dashboard_url, poll_interval_s=0.5, log=said.append)
    assert time.monotonic() - started < 30
    assert said == [
        f"Ray Job {first} of run 'it-busy' is still running: waiting for it "
        "instead of starting another"
    ]
    mine = [j for j in client.list_jobs() if (j.metadata or {}).get(RUN_NAME_KEY) == "it-busy"]
    assert [j.submission_id for j in mine] == [first]  # no second job was started
    deadline = time.monotonic() + 30
    while client.get_job_status(first) != JobStatus.STOPPED:
        assert time.monotonic() < deadline, client.get_job_status(first)
        time.sleep(0.5)


_LOCAL_FIT = """
import ray, ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.state import list_actors
from training.ray.connection import connect_ray

connect_ray("local")
TorchTrainer(
    lambda: ray.train.report({"done": 1}),
    scaling_config=ScalingConfig(num_workers=1),
    run_config=RunConfig(name="one", storage_path=STORAGE),
).fit()
actors = list_actors(address=ray.get_runtime_context().gcs_address, limit=1000)
print("actors:", sorted({a.class_name for a in actors}))
"""


def test_a_training_job_on_a_local_ray_starts_no_preemption_watcher(tmp_path):
    """A Ray started on this machine has no node a cloud drains: the job's controller
    runs without Ray Train's preemption watcher (and without the error line its actor
    logs at every start)."""
    ray_tmp = _ray_tmp()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TMPDIR"] = str(ray_tmp)
    script = _LOCAL_FIT.replace("STORAGE", repr(str(tmp_path)))
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240
        )
        deadline = time.monotonic() + 30
        while _processes_using(ray_tmp) and time.monotonic() < deadline:
            time.sleep(1)
        assert _processes_using(ray_tmp) == []  # its Ray went with it
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    actors = next(line for line in done.stdout.splitlines() if line.startswith("actors:"))
    assert "TrainController" in actors and "PreemptionWatcher" not in actors, actors
    assert "PreemptionWatcher" not in output
