"""Logging that waits out an outage: retries with backoff for transient failures,
none for a wrong request, and a buffer that is sent in order once the server is back.
(The integration suite stops a real tracking server mid-run.)"""

from __future__ import annotations

import time

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)

from training.mlflow.run_tracker import (
    RunTracker,
    TrackingUnavailable,
    is_transient,
    retry_tracking,
)


def test_outage_errors_are_transient_and_wrong_requests_are_not():
    assert is_transient(ConnectionError("refused"))
    assert is_transient(MlflowException("API request to http://x failed with exception ..."))
    assert is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_transient(MlflowException("no run", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_transient(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient(KeyError("bug"))


def test_retry_waits_out_an_outage_with_backoff():
    calls, slept = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 5:
            raise ConnectionError("tracking server down")
        return "done"

    assert retry_tracking(flaky, "logging", budget_s=600, sleep=slept.append) == "done"
    assert slept == [1.0, 2.0, 4.0, 8.0]


def test_retry_gives_up_after_the_budget_and_never_retries_a_wrong_request():
    def down() -> None:
        raise ConnectionError("http://user:hunter2@mlflow:5000 refused")

    with pytest.raises(TrackingUnavailable, match="did not answer") as caught:
        retry_tracking(down, "registering the model", budget_s=0.5, sleep=lambda s: None)
    assert "hunter2" not in str(caught.value)  # credentials in a URL are redacted
    calls = []

    def wrong() -> None:
        calls.append(1)
        raise MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)

    with pytest.raises(MlflowException):
        retry_tracking(wrong, "logging", sleep=lambda s: None)
    assert calls == [1]


@pytest.fixture(scope="module")
def sqlite_run(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("tracker", artifact_location=f"file://{folder}/a")
    return uri, client.create_run(experiment).info.run_id


def test_the_tracker_sends_everything_in_order_with_each_step(sqlite_run):
    uri, run_id = sqlite_run
    with RunTracker(uri, run_id) as tracker:
        for step in range(1, 2501):  # more than one log_batch call holds
            tracker.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
        tracker.log_image(np.zeros((4, 4, 1), np.uint8), "samples/grid.png")
    client = MlflowClient(uri)
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(1, 2501))
    assert history[-1].value == pytest.approx(1 / 2500)
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/grid.png"]


def test_image_series_and_system_metrics_reach_the_run(sqlite_run):
    uri, run_id = sqlite_run
    with RunTracker(uri, run_id) as tracker:
        tracker.monitor_system(interval_s=0.5)
        for step in (10, 20):
            tracker.log_image(np.full((6, 6, 3), step, np.uint8), key="samples/denoiser", step=step)
        time.sleep(1.6)
        with pytest.raises(ValueError, match="artifact_file, or key and step"):
            tracker.log_image(np.zeros((2, 2, 1), np.uint8))
    client = MlflowClient(uri)
    names = [a.path.removeprefix("images/") for a in client.list_artifacts(run_id, "images")]
    pngs = sorted(n for n in names if n.endswith(".png"))
    assert [n.split("+")[:3] for n in pngs] == [
        ["samples~denoiser", "step", "10"],
        ["samples~denoiser", "step", "20"],
    ]  # the key and step the MLflow UI's slider reads
    cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and [m.step for m in cpu] == sorted(m.step for m in cpu)


def test_a_wrong_request_surfaces_at_the_next_call_and_at_close(sqlite_run):
    uri, _ = sqlite_run
    tracker = RunTracker(uri, "0" * 32)  # no such run
    tracker.log_metrics({"loss": 1.0}, 1)
    with pytest.raises(TrackingUnavailable, match="failed"):
        tracker.close(timeout_s=30)


def _checkpoint(folder, step: int):
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(f'{{"step": {step}}}')
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_checkpoints_are_uploaded_and_only_the_newest_kept(sqlite_run, tmp_path):
    uri, run_id = sqlite_run
    with RunTracker(uri, run_id) as tracker:
        for step in (10, 20, 30):
            folder = _checkpoint(tmp_path / str(step), step)
            tracker.log_checkpoint(folder, f"checkpoints/denoiser/step-{step:07d}", keep_last=2)
            assert folder.is_dir()  # the caller's folder is left as it was
    client = MlflowClient(uri)
    kept = [a.path for a in client.list_artifacts(run_id, "checkpoints/denoiser")]
    assert kept == ["checkpoints/denoiser/step-0000020", "checkpoints/denoiser/step-0000030"]
    files = client.list_artifacts(run_id, "checkpoints/denoiser/step-0000030")
    assert sorted(f.path.rsplit("/", 1)[1] for f in files) == ["model.safetensors", "state.json"]
    # Uploads that lag behind skip the oldest waiting one, never the newest.
    assert tracker.checkpoints_sent[-1] == "checkpoints/denoiser/step-0000030"
    assert len(tracker.checkpoints_sent) + len(tracker.checkpoints_lost) == 3


def test_a_checkpoint_that_cannot_be_sent_is_given_up_without_failing_the_run(
    tmp_path, monkeypatch
):
    """The tracking server does not answer at all: the upload is retried until the
    budget is spent, then dropped with a warning; closing the tracker does not raise."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tracker = RunTracker(f"http://127.0.0.1:{port}", "0" * 32, outage_budget_s=2)
    tracker.log_checkpoint(_checkpoint(tmp_path / "c", 10), "checkpoints/x/step-0000010", 2)
    tracker.close(timeout_s=60)
    assert tracker.checkpoints_lost == ["checkpoints/x/step-0000010"]
    assert tracker.checkpoints_sent == []
