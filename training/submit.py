"""Training as a Ray Job: the orchestrator writes the job config to storage, submits
``python -m training.launch`` to the cluster's dashboard and waits, without ever
joining the cluster itself.

Credentials are not sent with the job: the cluster's nodes take them from their own
environment (instance role, Kubernetes secret, the standard AWS chain). Only the S3
endpoint and region travel, so a local S3 server works the same way as AWS.
"""

from __future__ import annotations

import json
import os
import shlex
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from data import storage
from training.job import TrainJobConfig

# Where an S3 server is and which region: settings, not secrets.
JOB_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_job_address(address: str | None) -> bool:
    """A Ray dashboard URL (``http://head:8265``): submit a Ray Job instead of joining."""
    return bool(address) and address.startswith(("http://", "https://"))


def check_reachable_from_cluster(job: TrainJobConfig, address: str) -> None:
    """A cluster on another machine cannot see this machine's folders or sqlite file."""
    if urlparse(address).hostname in LOCAL_HOSTS:
        return
    local = [
        name
        for name, value in (("storage", job.storage_url), ("data", job.data_url))
        if not value.startswith("s3://")
    ]
    if job.tracking_uri.startswith(("sqlite:", "file:", "/")):
        local.append("MLflow tracking URI")
    if local:
        named = local[0] if len(local) == 1 else f"{', '.join(local[:-1])} and {local[-1]}"
        raise ValueError(
            f"the Ray cluster at {address} is on another machine, but the {named} "
            f"{'is' if len(local) == 1 else 'are'} local to this one: use s3:// storage "
            "and data and an http(s) MLflow server"
        )


def submit_training(
    job: TrainJobConfig,
    address: str,
    *,
    python: str = "python",
    poll_interval_s: float = 2.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Submit ``job`` as a Ray Job to the dashboard at ``address`` and wait for it.

    Returns what the job wrote (``training.launch.result_record``): the MLflow run id,
    the registered version and the final checkpoints. Raises RuntimeError with the
    end of the job's log when the job fails or is stopped.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    check_reachable_from_cluster(job, address)
    root = f"{job.storage_url}/{job.run_name}"
    attempt = uuid.uuid4().hex[:8]
    config_url, result_url = f"{root}/job.json", f"{root}/result-{attempt}.json"
    storage.write_bytes(config_url, job.model_dump_json(indent=2).encode())

    env = {name: os.environ[name] for name in JOB_ENV if os.environ.get(name)}
    entrypoint = " ".join(
        [python, "-m", "training.launch", shlex.quote(config_url), "--result",
         shlex.quote(result_url)]
    )  # fmt: skip
    client = JobSubmissionClient(address)
    submission_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=f"{job.run_name}-{attempt}",
        runtime_env={"env_vars": env} if env else None,
        metadata={"ldm.run_name": job.run_name, "ldm.model_name": job.model_name},
    )
    log(f"submitted Ray Job {submission_id} to {address}: {entrypoint}")
    status = client.get_job_status(submission_id)
    while not status.is_terminal():
        time.sleep(poll_interval_s)
        status = client.get_job_status(submission_id)
    if status != JobStatus.SUCCEEDED:
        tail = client.get_job_logs(submission_id)[-3000:]
        raise RuntimeError(
            f"Ray Job {submission_id} ended {status.value}; the end of its log:\n{tail}"
        )
    log(f"Ray Job {submission_id} succeeded")
    return json.loads(storage.read_bytes(result_url))
