"""Training as a Ray Job: the orchestrator writes the job config to storage, submits
``python -m training.ray.driver`` to the cluster's dashboard and waits, without ever
joining the cluster itself.

Credentials are not sent with the job: the cluster's nodes take them from their own
environment (instance role, Kubernetes secret, the standard AWS chain). Only the S3
endpoint and region travel, so a local S3 server works the same way as AWS.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from data import storage
from data.environment import settings_env
from data.manifest import load_manifest
from training.job import TrainedVersion, TrainJobConfig
from training.ray.connection import is_job_address

RUN_NAME_KEY, RESULT_URL_KEY = "ldm.run_name", "ldm.result_url"  # Ray Job metadata
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def train_job(
    job: TrainJobConfig, address: str | None = None, log: Callable[[str], None] = print
) -> TrainedVersion:
    """Run ``job`` where ``address`` says: submitted as a Ray Job when it is a dashboard
    URL (this machine never joins the cluster), else from this process on the cluster
    at ``address`` (a GCS address, ``auto``; None: ``RAY_ADDRESS`` or a local Ray)."""
    if is_job_address(address):
        return submit_training(job, address, log=log)
    from training.ray.driver import result_record, run_training

    return result_record(run_training(job, address))


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
    timeout_s: float | None = None,
    log: Callable[[str], None] = print,
) -> TrainedVersion:
    """Submit ``job`` as a Ray Job to the dashboard at ``address`` and wait for it.

    A job of the same ``run_name`` that is still running (a retried flow task, a second
    ``ldm train``) is waited for instead of starting another. Waiting ends after
    ``timeout_s`` (default ``job.job_timeout_s``); on that deadline, or any error or
    interruption while waiting, the job is stopped before the error propagates.

    Returns what the job wrote (``training.ray.driver.result_record``): the MLflow run id,
    the registered version and the final checkpoints. Raises RuntimeError with the
    end of the job's log when the job fails or is stopped.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    check_reachable_from_cluster(job, address)
    if not job.data_url.startswith("s3://"):  # a folder here: missing data fails before the job
        load_manifest(job.data_url)
    client = JobSubmissionClient(address)
    running = find_running_job(client, job.run_name)
    if running is not None:
        submission_id, result_url = running
        log(
            f"Ray Job {submission_id} of run '{job.run_name}' is still running: waiting for "
            "it instead of starting another"
        )
    else:
        submission_id, result_url = _submit(client, job, python, log)
    deadline = time.monotonic() + (timeout_s or job.job_timeout_s)
    try:
        status = _wait(client, submission_id, deadline, poll_interval_s)
    except BaseException:  # the deadline, Ctrl-C, a cancelled flow: leave nothing running
        with contextlib.suppress(Exception):
            client.stop_job(submission_id)
        raise
    if status != JobStatus.SUCCEEDED:
        raise_recorded_failure(result_url)
        tail = client.get_job_logs(submission_id)[-3000:]
        raise RuntimeError(
            f"Ray Job {submission_id} ended {status.value}; the end of its log:\n{tail}"
        )
    log(f"Ray Job {submission_id} succeeded")
    return TrainedVersion.model_validate_json(storage.read_bytes(result_url))


def run_ldm_job(
    address: str,
    arguments: list[str],
    *,
    python: str = "python",
    timeout_s: float = 24 * 3600.0,
    poll_interval_s: float = 2.0,
    log: Callable[[str], None] = print,
) -> str:
    """Run ``ldm ARGUMENTS`` as a Ray Job on the cluster whose dashboard is at
    ``address`` and wait for it; returns the job's log. The job's driver runs on the
    cluster, so paths in ``arguments`` must be reachable from there (s3:// URLs).
    Stopped on the deadline, an error or an interruption; RuntimeError with the end
    of its log when it fails."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    entrypoint = " ".join([python, "-m", "flows.cli", *map(shlex.quote, arguments)])
    env = settings_env()  # where S3 is; credentials come from the nodes
    submission_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=f"ldm-{arguments[0]}-{uuid.uuid4().hex[:8]}",
        runtime_env={"env_vars": env} if env else None,
    )
    log(f"submitted Ray Job {submission_id}: {entrypoint}")
    try:
        hint = "; it was stopped. A re-run continues where it stopped"
        deadline = time.monotonic() + timeout_s
        status = _wait(client, submission_id, deadline, poll_interval_s, hint)
    except BaseException:
        with contextlib.suppress(Exception):
            client.stop_job(submission_id)
        raise
    logs = client.get_job_logs(submission_id)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(
            f"Ray Job {submission_id} ended {status.value}; the end of its log:\n{logs[-3000:]}"
        )
    return logs


def raise_recorded_failure(result_url: str) -> None:
    """A failed job's driver records a failure that retrying cannot fix (a non-finite
    loss, workers no node can hold, a setting or dataset the job cannot use, storage
    that refuses it) in its result file: raise it as itself, so orchestrators do not
    retry."""
    from training.optimisation import NonFiniteLoss
    from training.ray.placement import Unplaceable

    try:
        record = json.loads(storage.read_bytes(result_url))
    except (FileNotFoundError, ValueError):
        return
    if "nonfinite" in record:
        raise NonFiniteLoss(record["nonfinite"]["stage"], record["nonfinite"]["step"])
    if "unplaceable" in record:
        raise Unplaceable(record["unplaceable"])
    if "permanent_storage" in record:
        raise storage.PermanentStorageError(record["permanent_storage"])
    if "invalid" in record:
        raise ValueError(record["invalid"])


def find_running_job(client: Any, run_name: str) -> tuple[str, str] | None:
    """(submission id, result URL) of an unfinished Ray Job of ``run_name``, if any."""
    for details in client.list_jobs():
        metadata = details.metadata or {}
        if metadata.get(RUN_NAME_KEY) == run_name and not details.status.is_terminal():
            return details.submission_id, metadata[RESULT_URL_KEY]
    return None


def _submit(
    client: Any, job: TrainJobConfig, python: str, log: Callable[[str], None]
) -> tuple[str, str]:
    root = f"{job.storage_url}/{job.run_name}"
    attempt = uuid.uuid4().hex[:8]
    config_url, result_url = f"{root}/job.json", f"{root}/result-{attempt}.json"
    storage.write_bytes(config_url, job.model_dump_json(indent=2).encode())
    env = settings_env()  # where S3 is; credentials come from the nodes
    entrypoint = " ".join(
        [
            python,
            "-m",
            "training.ray.driver",
            shlex.quote(config_url),
            "--result",
            shlex.quote(result_url),
        ]
    )
    submission_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=f"{job.run_name}-{attempt}",
        runtime_env={"env_vars": env} if env else None,
        metadata={
            RUN_NAME_KEY: job.run_name,
            "ldm.model_name": job.model_name,
            RESULT_URL_KEY: result_url,
        },
    )
    log(f"submitted Ray Job {submission_id}: {entrypoint}")
    return submission_id, result_url


_TRAINING_DEADLINE = (
    "(job_timeout_s); it was stopped. Raise job_timeout_s for longer runs; a re-run with "
    "the same run name resumes from its checkpoints"
)


def _wait(
    client: Any,
    submission_id: str,
    deadline: float,
    poll_interval_s: float,
    hint: str = _TRAINING_DEADLINE,
) -> Any:
    status = client.get_job_status(submission_id)
    while not status.is_terminal():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"Ray Job {submission_id} was still {status.value} at the deadline {hint}"
            )
        time.sleep(poll_interval_s)
        status = client.get_job_status(submission_id)
    return status
