"""The event that says a dataset was published, and the trigger that answers it.

``ldm shard`` and the ``shard-dataset`` flow emit ``ldm.dataset.sharded`` (resource
``ldm.dataset.<url>``, payload ``dataset_url``, ``fingerprint``, ``counts``) whenever a
Prefect server is configured; a deployment with :func:`dataset_trigger` then retrains
on that dataset as it is. The retrain flow's own sharding emits nothing, so a
triggered run cannot trigger itself.
"""

from __future__ import annotations

import os
import sys
from typing import Any

DATASET_EVENT = "ldm.dataset.sharded"
DATASET_RESOURCE = "ldm.dataset."


def dataset_resource_id(dataset_url: str) -> str:
    return DATASET_RESOURCE + dataset_url.rstrip("/")


def emit_dataset_event(dataset_url: str, fingerprint: str, counts: dict[str, int]) -> bool:
    """Tell the Prefect server that ``dataset_url`` holds a new manifest; does nothing
    (False) when no server is configured (PREFECT_API_URL, or a flow run's server) or
    Prefect is not installed (an image with the training requirements alone)."""
    try:
        from prefect.settings import PREFECT_API_URL
    except ImportError:
        if os.environ.get("PREFECT_API_URL"):
            print(
                "note: PREFECT_API_URL is set, but Prefect is not installed here: the new "
                "dataset was not announced (pip install prefect)",
                file=sys.stderr,
            )
        return False

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
