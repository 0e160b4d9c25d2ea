"""Whether a cluster can ever hold a serving replica or a training worker group, read
from Ray's node table and its autoscaler's report."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from serving.config import AppConfig
from serving.deploy import DeployError, UnplaceableReplica, replica_resources
from training.ray.placement import Unplaceable, autoscaler_adds_nodes, placement_problem


def _node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    resources = {"CPU": cpus, "memory": 8e9} | ({"GPU": gpus} if gpus else {})
    return {"Alive": alive, "Resources": resources}


def test_a_replica_fits_when_one_node_has_all_it_needs():
    assert replica_resources(AppConfig()) == {"CPU": 1.0}
    assert replica_resources(AppConfig(num_cpus=0.5, num_gpus=1)) == {"CPU": 0.5, "GPU": 1.0}
    assert placement_problem({"CPU": 1.0}, [_node(2)]) is None
    assert placement_problem({"CPU": 1.0, "GPU": 1.0}, [_node(2), _node(8, gpus=1)]) is None
    assert placement_problem({}, [_node(0)]) is None  # a replica of no resources fits anywhere


def test_no_node_with_a_gpu_is_named_with_what_the_nodes_have():
    problem = placement_problem({"CPU": 1.0, "GPU": 1.0}, [_node(2), _node(2)])
    assert problem == (
        "a replica needs 1 CPU, 1 GPU; no node of the Ray cluster has that "
        "(its nodes: 2 CPU, 0 GPU; 2 CPU, 0 GPU)"
    )


def test_resources_split_over_nodes_or_on_dead_nodes_do_not_count():
    # 2 CPUs here and a GPU there: no single node holds the replica
    assert placement_problem({"CPU": 2.0, "GPU": 1.0}, [_node(2), _node(1, gpus=1)])
    assert placement_problem({"CPU": 4.0}, [_node(2), _node(8, alive=False)]) == (
        "a replica needs 4 CPU; no node of the Ray cluster has that (its nodes: 2 CPU)"
    )


def test_the_flows_retry_a_deploy_that_timed_out_but_not_an_unplaceable_replica():
    from flows.tasks import _is_transient

    def retried(error: Exception) -> bool:
        return _is_transient(None, None, SimpleNamespace(data=error))

    assert retried(DeployError("'ldm' was not RUNNING 300 s after the deploy"))
    assert not retried(UnplaceableReplica("a replica needs 1 GPU; …"))


def test_a_worker_group_counts_the_workers_each_node_holds_by_strategy():
    two_by_two = [_node(2), _node(2)]
    assert placement_problem({"CPU": 1.0}, two_by_two, count=4) is None  # PACK: 2 + 2
    assert placement_problem({"CPU": 2.0}, two_by_two, 2, "STRICT_SPREAD") is None
    assert placement_problem({"CPU": 0.5}, [_node(1.5)], count=3) is None  # 1.5 / 0.5, no loss
    assert placement_problem({"CPU": 1.0}, two_by_two, 3, "STRICT_PACK", "training worker") == (
        "3 training workers need 1 CPU each on one node; the Ray cluster holds 2 "
        "(its nodes: 2 CPU; 2 CPU)"
    )
    assert placement_problem({"CPU": 1.0}, two_by_two, 3, "STRICT_SPREAD", "training worker") == (
        "3 training workers need 1 CPU each on nodes of their own; the Ray cluster holds 2 "
        "(its nodes: 2 CPU; 2 CPU)"
    )
    assert placement_problem({"CPU": 2.0}, [_node(1), _node(1)], 1, "PACK", "training worker") == (
        "a training worker needs 2 CPU; no node of the Ray cluster has that "
        "(its nodes: 1 CPU; 1 CPU)"
    )


def _report(types: dict[str, str]) -> dict:
    return {"load_metrics_report": {}, "autoscaler_report": {"node_type_mapping": types}}


def test_a_cluster_started_by_ray_start_is_known_not_to_grow():
    # Ray's read-only autoscaler (`ray start`, no autoscaling config): a type per node
    assert not autoscaler_adds_nodes(_report({"ab12": "node_ab12", "cd34": "node_cd34"}))
    # a configured autoscaler names the node groups it launches from
    assert autoscaler_adds_nodes(_report({"ab12": "head", "cd34": "cpu-workers"}))
    assert autoscaler_adds_nodes(_report({"ab12": "node_ab12", "cd34": "gpu-workers"}))
    # nothing reported yet, or no monitor: it may grow
    assert autoscaler_adds_nodes(_report({}))
    assert autoscaler_adds_nodes({"load_metrics_report": {}})
    assert autoscaler_adds_nodes({})


def test_unplaceable_is_a_setting_to_change_and_its_record_is_raised_as_itself(tmp_path):
    from flows.tasks import _is_transient
    from training.ray.submit import raise_recorded_failure

    record = tmp_path / "result.json"
    record.write_text('{"unplaceable": "a training worker needs 2 CPU; …"}')
    with pytest.raises(Unplaceable, match="^a training worker needs 2 CPU; …$") as raised:
        raise_recorded_failure(str(record))
    assert not _is_transient(None, None, SimpleNamespace(data=raised.value))
