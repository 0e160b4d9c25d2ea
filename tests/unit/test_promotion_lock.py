"""The registry lock of a promotion (on a real sqlite-backed MLflow registry): only
its holder releases it, a stale one is broken by exactly one contender."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow import MlflowClient

from training.evaluation.promotion import STALE_LOCK_SECONDS, PromotionConflict, _RegistryLock


@pytest.fixture
def client(tmp_path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path / 'registry.db'}")


def _holder(client: MlflowClient) -> str | None:
    try:
        return client.get_registered_model("m.promotion-lock").tags["holder"]
    except Exception:
        return None


def test_the_lock_is_exclusive_and_released_by_its_holder(client):
    with _RegistryLock(client, "m") as lock:
        assert _holder(client) == lock.token
        with pytest.raises(PromotionConflict, match="moving its aliases right now"):
            _RegistryLock(client, "m").__enter__()
    assert _holder(client) is None
    with _RegistryLock(client, "m"):  # free again
        pass


def test_a_holder_whose_lock_was_taken_over_does_not_release_the_new_one(client):
    first = _RegistryLock(client, "m").__enter__()
    client.delete_registered_model("m.promotion-lock")  # as if broken as stale
    second = _RegistryLock(client, "m").__enter__()
    first.__exit__(None, None, None)
    assert _holder(client) == second.token  # still held by the second
    second.__exit__(None, None, None)
    assert _holder(client) is None


def _stale_lock(client: MlflowClient) -> None:
    since = time.time() - STALE_LOCK_SECONDS - 60
    client.create_registered_model(
        "m.promotion-lock", tags={"holder": "dead-holder", "since": str(since)}
    )


@pytest.mark.parametrize("contenders", [2, 4])
def test_of_contenders_racing_over_a_stale_lock_exactly_one_wins(tmp_path, contenders):
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    _stale_lock(MlflowClient(uri))
    start, outcomes = threading.Barrier(contenders), []

    def contend() -> None:
        lock = _RegistryLock(MlflowClient(uri), "m")
        start.wait()
        try:
            with lock:
                outcomes.append("won")
                time.sleep(0.5)  # hold it while the others try
        except PromotionConflict:
            outcomes.append("lost")

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["lost"] * (contenders - 1) + ["won"]
    assert _holder(MlflowClient(uri)) is None  # the winner released it


def test_a_stale_lock_is_broken_only_once(client):
    _stale_lock(client)
    with _RegistryLock(client, "m") as lock:
        assert _holder(client) == lock.token
    _stale_lock(client)  # the same dead holder again: its lock was broken before
    with pytest.raises(PromotionConflict, match="breaking a stale lock"):
        _RegistryLock(client, "m").__enter__()
