"""The ``retrain`` flow as a Prefect deployment: on a cron schedule, and on the event
that says a dataset was published (``flows.events``)."""

from __future__ import annotations

from typing import Any

from flows.events import dataset_trigger
from flows.retrain import retrain
from flows.retrain_config import RetrainConfig


def retrain_deployment(
    config: RetrainConfig,
    name: str = "scheduled",
    cron: str | None = None,
    timezone: str = "UTC",
    on_new_dataset: bool = False,
) -> Any:  # RunnerDeployment
    """The ``retrain/<name>`` deployment with ``config`` as its parameters."""
    from prefect.schedules import Cron

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
