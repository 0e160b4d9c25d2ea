"""Which Ray to join: a stale address file is ignored, a cluster that does not answer
is an error within the timeout, a dashboard URL is not a driver address."""

from __future__ import annotations

import socket
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from training.ray.connection import RayUnavailable, answers, forget_address, resolve_address


def _dead_address() -> str:
    with socket.socket() as probe:  # free a moment ago, nothing listens now
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture
def ray_tmp(monkeypatch) -> Path:
    """A Ray temp folder of this test alone (short: Ray puts sockets in it)."""
    folder = Path(tempfile.mkdtemp(prefix="ldmr", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (folder / "ray").mkdir()
    return folder / "ray"


@pytest.fixture
def grpc_server():
    server = grpc.server(futures.ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_no_address_and_no_address_file_starts_a_local_ray(ray_tmp):
    assert resolve_address(None) is None
    assert resolve_address("local") is None


def test_a_stale_address_file_is_ignored_quickly(ray_tmp, caplog):
    dead = _dead_address()
    (ray_tmp / "ray_current_cluster").write_text(dead)
    started = time.monotonic()
    assert resolve_address(None) is None  # a new local Ray, not a wait on the dead GCS
    assert time.monotonic() - started < 10
    assert f"names {dead}, which does not answer" in caplog.text


def test_a_live_address_file_is_joined(ray_tmp, grpc_server):
    (ray_tmp / "ray_current_cluster").write_text(grpc_server)
    assert resolve_address(None) == grpc_server
    assert resolve_address("auto") == grpc_server


def test_a_named_cluster_that_does_not_answer_is_an_error_within_the_timeout(ray_tmp):
    dead = _dead_address()
    started = time.monotonic()
    with pytest.raises(RayUnavailable, match=f"no Ray cluster answers at {dead}"):
        resolve_address(dead, timeout_s=2)
    assert time.monotonic() - started < 8
    with pytest.raises(RayUnavailable, match="no running Ray cluster found"):
        resolve_address("auto", timeout_s=1)


def test_ray_address_from_the_environment_is_checked_too(ray_tmp, monkeypatch, grpc_server):
    monkeypatch.setenv("RAY_ADDRESS", f"ray://{grpc_server}")
    assert resolve_address(None) == f"ray://{grpc_server}"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ValueError, match="is a Ray dashboard URL"):
        resolve_address(None)


def test_answers_needs_a_grpc_server_not_just_an_open_port(grpc_server):
    assert answers(grpc_server, 2)
    with socket.socket() as listener:  # accepts TCP, never speaks HTTP/2
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert not answers(f"127.0.0.1:{listener.getsockname()[1]}", 1.5)
    with pytest.raises(ValueError, match="HOST:PORT"):
        answers("just-a-host", 1)


def test_forget_address_removes_only_the_named_cluster_in_any_form_ray_wrote(ray_tmp):
    import ray

    record = ray_tmp / "ray_current_cluster"
    record.write_text("127.0.0.1:6379")
    forget_address("127.0.0.1:7000")
    assert record.exists()
    forget_address("127.0.0.1:6379")
    assert not record.exists()
    record.write_text(f"{ray.util.get_node_ip_address()}:6379")  # what `ray start` writes
    forget_address("127.0.0.1:6379")
    assert not record.exists()


def test_sigterm_while_a_command_waits_for_ray_ends_it_as_ctrl_c(ray_tmp, monkeypatch, capsys):
    """A service manager's stop during the wait for a cluster: exit 130 at once, not
    after the connect timeout."""
    import os
    import signal
    import threading

    import numpy as np

    from data.manifest import ShardOptions
    from data.shard import shard_dataset
    from flows.cli import main

    images = np.random.default_rng(0).integers(0, 256, (40, 16, 16), dtype=np.uint8)
    np.savez(ray_tmp / "src.npz", images=images, labels=np.arange(40) % 10)
    options = ShardOptions(image_size=16, channels=1, val_fraction=0.1)
    shard_dataset(str(ray_tmp / "src.npz"), str(ray_tmp / "data"), options, progress=False)
    monkeypatch.setenv("RAY_ADDRESS", _dead_address())
    monkeypatch.setenv("LDM_HOME", str(ray_tmp / "home"))
    before = signal.getsignal(signal.SIGTERM)
    stop = threading.Timer(3, os.kill, (os.getpid(), signal.SIGTERM))
    stop.start()
    start = time.monotonic()
    try:
        code = main(["train", str(ray_tmp / "data"), "--preset", "tiny"])
    finally:
        stop.cancel()
        signal.signal(signal.SIGTERM, before)
    assert code == 130
    assert time.monotonic() - start < 10  # the wait for Ray is 30 s
    assert "ldm train: interrupted" in capsys.readouterr().err
