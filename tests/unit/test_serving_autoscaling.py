"""The autoscaling policy of the sampling app: replicas follow the rows the replicas
hold and the rows that wait, and never fall below what the request count asks for."""

from types import SimpleNamespace

import pytest
from ray.serve.config import AutoscalingConfig

from serving.autoscaling import WaitingWorkPolicy
from serving.config import AppConfig


def _context(replicas: int, requests: float, active: list[float], waiting: list[float]):
    """An AutoscalingContext as Serve's controller gives it (only what the policy reads)."""
    ids = [f"replica-{i}" for i in range(len(active))]
    return SimpleNamespace(
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        total_num_requests=requests,
        aggregated_metrics={
            "active_rows": dict(zip(ids, active, strict=True)),
            "waiting_rows": dict(zip(ids, waiting, strict=True)),
        },
        config=AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=64),
    )


def test_waiting_rows_add_replicas_that_the_request_count_would_not():
    policy = WaitingWorkPolicy(target_rows_per_replica=32)
    # Three requests of many images each: 3 requests are far below 64 per replica,
    # but one replica holds a full forward and 64 rows wait.
    wanted, state = policy(_context(1, requests=3, active=[32], waiting=[64]))
    assert wanted == pytest.approx(3.0) and state == {}


def test_part_empty_forwards_ask_for_fewer_replicas():
    policy = WaitingWorkPolicy(target_rows_per_replica=32)
    wanted, _ = policy(_context(2, requests=4, active=[8, 4], waiting=[0, 0]))
    assert wanted == pytest.approx(12 / 32)


def test_requests_piling_up_before_the_replicas_still_count():
    policy = WaitingWorkPolicy(target_rows_per_replica=32)
    wanted, _ = policy(_context(1, requests=192, active=[1], waiting=[0]))
    assert wanted == pytest.approx(3.0)


def test_no_metrics_yet_and_no_replicas():
    policy = WaitingWorkPolicy(target_rows_per_replica=8)
    assert policy.replicas_for(None) == 0
    assert policy(_context(0, requests=5, active=[], waiting=[]))[0] == 0
    with pytest.raises(ValueError, match="target_rows_per_replica must be > 0"):
        WaitingWorkPolicy(0)


def test_the_app_deploys_with_the_policy_and_a_target_of_one_forward():
    config = AppConfig.model_validate(
        {
            "max_rows_per_forward": 16,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1},
        }
    )
    options = config.deployment_options()["autoscaling_config"]
    assert options["policy"] == {
        "policy_function": "serving.autoscaling:WaitingWorkPolicy",
        "policy_kwargs": {"target_rows_per_replica": 16},
    }
    assert "target_rows_per_replica" not in options
    # Serve accepts it as it is, and resolves the policy to this class.
    serve_config = AutoscalingConfig(**options)
    assert serve_config.upscale_delay_s == 1 and serve_config.max_replicas == 2
    assert serve_config.policy.get_policy().__name__ == "WaitingWorkPolicy"
    chosen = AppConfig.model_validate(
        {"autoscaling_config": {"max_replicas": 2, "target_rows_per_replica": 40}}
    )
    policy = chosen.deployment_options()["autoscaling_config"]["policy"]
    assert policy["policy_kwargs"] == {"target_rows_per_replica": 40}
