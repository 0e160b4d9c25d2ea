"""The ``retrain`` flow as a Prefect deployment: on a cron schedule, and on an event
that says a dataset was published.

``ldm shard`` and the ``shard-dataset`` flow emit ``ldm.dataset.sharded`` (resource
``ldm.dataset.<url>``, payload ``dataset_url``, ``fingerprint``, ``counts``) whenever a
Prefect server is configured; a deployment with the dataset trigger then retrains on
that dataset as it is. The retrain flow's own sharding emits nothing, so a triggered
run cannot trigger itself.
"""

from __future__ import annotations

from typing import Any

DATASET_EVENT = "ldm.dataset.sharded"
DATASET_RESOURCE = "ldm.dataset."


def dataset_resource_id(dataset_url: str) -> str:
    return DATASET_RESOURCE + dataset_url.rstrip("/")


def emit_dataset_event(dataset_url: str, fingerprint: str, counts: dict[str, int]) -> bool:
    """Tell the Prefect server that ``dataset_url`` holds a new manifest; does nothing
    (False) when no server is configured (PREFECT_API_URL, or a flow run's server)."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return False
    from prefect.events import emit_event

    event = emit_event(
        event=DATASET_EVENT,
        resource={
            "prefect.resource.id": dataset_resource_id(dataset_url),
            "prefect.resource.name": dataset_url,
        },
        payload={"dataset_url": dataset_url, "fingerprint": fingerprint, "counts": counts},
    )
    return event is not None


def dataset_trigger(dataset_url: str | None = None) -> Any:  # DeploymentEventTrigger
    """Run the deployment on each new manifest (of ``dataset_url``, or of any dataset),
    training on that dataset without re-sharding it."""
    from prefect.events import DeploymentEventTrigger

    resource = dataset_resource_id(dataset_url) if dataset_url else DATASET_RESOURCE + "*"
    return DeploymentEventTrigger(
        name="new-dataset",
        expect={DATASET_EVENT},
        match={"prefect.resource.id": resource},
        parameters={"new_dataset": "{{ event.payload.dataset_url }}"},
    )


def retrain_deployment(
    config: Any,  # flows.retrain.RetrainConfig
    name: str = "scheduled",
    cron: str | None = None,
    timezone: str = "UTC",
    on_new_dataset: bool = False,
) -> Any:  # RunnerDeployment
    """The ``retrain/<name>`` deployment with ``config`` as its parameters."""
    from prefect.schedules import Cron

    from flows.retrain import retrain

    if not cron and not on_new_dataset:
        raise ValueError(
            "say when to retrain: --cron 'MIN HOUR DOM MON DOW', --on-new-dataset, or both"
        )
    schedules = [Cron(cron, timezone=timezone)] if cron else None
    return retrain.to_deployment(
        name=name,
        schedules=schedules,
        triggers=[dataset_trigger()] if on_new_dataset else None,
        parameters={"config": config.model_dump(mode="json")},
        description="ldm retrain on a schedule or a new dataset (see 'ldm schedule --help')",
        tags=["ldm"],
    )


def serve_deployments(*deployments: Any) -> None:
    """Register the deployments and run their flow runs from this process until Ctrl-C."""
    from prefect import serve

    serve(*deployments, pause_on_shutdown=False)
