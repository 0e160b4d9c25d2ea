"""Whether a cluster can ever hold a replica, read from Ray's node table."""

from __future__ import annotations

from types import SimpleNamespace

from serving.config import AppConfig
from serving.deploy import DeployError, UnplaceableReplica, placement_problem, replica_resources


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
