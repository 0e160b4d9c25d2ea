"""The ``retrain`` Prefect flow end to end on the tiny preset, against the S3 server,
a real MLflow server, the two-node Ray cluster and Prefect's test harness."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import numpy as np
import pytest
from PIL import Image
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from data import storage
from data.manifest import load_manifest
from data.reader import build_loader
from flows.retrain import retrain, shard_flow
from flows.retrain_config import RetrainConfig, ServeSettings, ShardSettings, WarmStartSettings
from flows.tasks import shard
from tests.integration.services import free_port
from training.evaluation.scoring import EvaluationSettings
from training.job import TrainSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    import os

    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def config(ray_cluster, mlflow_server, s3_session, tmp_path_factory) -> RetrainConfig:
    return RetrainConfig(
        source="mnist",
        dataset_url="s3://ldm-data/retrain-mnist",
        shard=ShardSettings(channels=1, shard_max_samples=600),
        train=TrainSettings(
            preset="tiny",
            storage_url="s3://ldm-runs/retrain",
            model_name="retrain-it",
            tracking_uri=mlflow_server,
        ),
        evaluator_cache="s3://ldm-runs/evaluators",
        evaluation=EvaluationSettings(samples_per_class=10, steps=10),
        serve=ServeSettings(port=free_port()),
        out_dir=str(tmp_path_factory.mktemp("retrain")),
    )


@pytest.fixture(scope="module")
def first_report(prefect_harness, config):
    from ray import serve

    report = retrain(config)
    yield report
    serve.shutdown()  # Serve is cluster-wide: leave none behind for later modules


async def _artifact_markdown() -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retrain-report"]))
        )
    return max(found, key=lambda artifact: artifact.created).data if found else ""


def test_first_retrain_shards_trains_promotes_serves_and_samples(first_report, config):
    report = first_report
    assert report.dataset.resharded and report.dataset.counts["train"] == 4500
    assert report.promotion.promoted
    assert "no @champion" in report.promotion.reason
    grid = np.asarray(Image.open(report.endpoint.grid))
    rows, cols = (grid.shape[0] - 2) // 34, (grid.shape[1] - 2) // 34  # 32×32 cells, 2 px apart
    assert (rows - 1) * cols < 10 <= rows * cols  # one sample of every class
    with urllib.request.urlopen(f"{report.endpoint.url}/v1/model", timeout=30) as response:
        info = json.loads(response.read())
    assert info["name"] == config.train.model_name
    assert str(info["version"]) == report.training.version
    markdown = asyncio.run(_artifact_markdown())
    assert "promoted to @champion" in markdown and report.training.run_id in markdown


def test_a_failed_upload_is_retried_and_the_dataset_is_complete(
    prefect_harness, s3_session, monkeypatch
):
    real_put, calls = storage.put_file, []

    def flaky_put(local, url, metadata=None):
        calls.append(url)
        if len(calls) == 3:
            raise storage.StorageError(f"simulated S3 outage while uploading {url}")
        return real_put(local, url, metadata)

    monkeypatch.setattr(storage, "put_file", flaky_put)
    url = "s3://ldm-data/flaky-mnist"

    @flow
    def only_shard():
        return shard("mnist", url, ShardSettings(channels=1, shard_max_samples=600))

    result = only_shard()
    assert len(calls) > 9  # 9 shards, one of them sent twice after the retry
    manifest = load_manifest(url)
    assert result.counts == manifest.counts == {"train": 4500, "val": 500}
    read = sum(
        len(y) for y in (b[1] for b in build_loader(url, "train", 0, 1, 4500, 0, 0, num_workers=0))
    )
    assert read == 4500


def test_a_missing_bucket_fails_the_task_at_once_without_retries(
    prefect_harness, s3_session, monkeypatch
):
    import data.shard

    real, attempts = data.shard.existing_dataset, []

    def counted(*args, **kwargs):
        attempts.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(data.shard, "existing_dataset", counted)

    @flow
    def only_shard():
        return shard("mnist", "s3://no-such-bucket-ldm/mnist", ShardSettings(channels=1))

    with pytest.raises(storage.PermanentStorageError, match="bucket 'no-such-bucket-ldm' does"):
        only_shard()
    assert len(attempts) == 1  # retries cannot create a bucket


def _dataset_events(url: str) -> list[dict]:
    from prefect.settings import PREFECT_API_URL

    from flows.events import DATASET_EVENT, dataset_resource_id

    body = {
        "filter": {
            "event": {"name": [DATASET_EVENT]},
            "resource": {"id": [dataset_resource_id(url)]},
        },
        "limit": 50,
    }
    request = urllib.request.Request(
        f"{PREFECT_API_URL.value()}/events/filter",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["events"]


def test_the_shard_flow_announces_new_shards_only(prefect_harness, s3_session):
    import time

    url, options = "s3://ldm-data/announced-mnist", ShardSettings(channels=1, shard_max_samples=600)
    first = shard_flow("mnist", url, options)
    second = shard_flow("mnist", url, options)  # up to date: nothing new to announce
    assert first.resharded and not second.resharded
    deadline = time.monotonic() + 30
    while not _dataset_events(url) and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(3)  # a second event, if one were sent, would have arrived by now
    (event,) = _dataset_events(url)
    assert event["payload"]["dataset_url"] == url
    assert event["payload"]["fingerprint"] == first.fingerprint
    assert event["payload"]["counts"] == {"train": 4500, "val": 500}


async def _deployment(name: str, timeout: float):
    from prefect.client.orchestration import get_client

    deadline = asyncio.get_running_loop().time() + timeout
    async with get_client() as client:
        while True:
            try:
                return await client.read_deployment_by_name(name)
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(1)


async def _finished_runs(deployment_id, timeout: float) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = asyncio.get_running_loop().time() + timeout
    async with get_client() as client:
        while asyncio.get_running_loop().time() < deadline:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
            if runs and all(run.state and run.state.is_final() for run in runs):
                return runs
            await asyncio.sleep(2)
    raise TimeoutError(f"no finished flow run of deployment {deployment_id} in {timeout:.0f} s")


def _markdown_field(markdown: str, name: str) -> str:
    (line,) = [line for line in markdown.splitlines() if line.startswith(f"- **{name}**: ")]
    return line.removeprefix(f"- **{name}**: ")


def test_a_new_dataset_triggers_a_scheduled_warm_retrain_through_the_dashboard(
    prefect_harness, first_report, config, ray_cluster, mlflow_server, tmp_path
):
    """``ldm schedule`` registers retrain/NAME with its cron schedule; ``ldm shard``
    to a new URL announces the dataset; the trigger runs a retrain on it as it is,
    through the cluster's dashboard: training as a Ray Job that warm-starts from the
    champion (the first run's version, its autoencoder kept), the endpoint updated by a
    config-file deploy through the Serve REST API, and a report that explains it all."""
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL
    from ray.job_submission import JobStatus, JobSubmissionClient

    from tests.integration.services import stop_process_group

    warm = WarmStartSettings(from_champion=True, reuse_autoencoder=True)
    settings = config.model_copy(
        update={"ray_address": ray_cluster.dashboard_url, "warm_start": warm}
    )
    (tmp_path / "retrain.json").write_text(settings.model_dump_json())
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    ldm = [sys.executable, "-m", "flows.cli"]
    log = tmp_path / "schedule.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [
                *ldm,
                "schedule",
                "--cron",
                "0 3 * * 1",
                "--on-new-dataset",
                "--name",
                "it",
                "--config",
                str(tmp_path / "retrain.json"),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deployment = asyncio.run(_deployment("retrain/it", timeout=120))
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 1"]
        before = MlflowClient(mlflow_server).search_model_versions(
            f"name='{config.train.model_name}'"
        )

        url = "s3://ldm-data/published-mnist"
        shard = subprocess.run(
            [*ldm, "shard", "mnist", url, "--shard-max-samples", "600", "--no-progress"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert shard.returncode == 0, shard.stderr
        assert "announced to Prefect" in shard.stdout

        (run,) = asyncio.run(_finished_runs(deployment.id, timeout=420))
        assert run.state.is_completed(), log.read_text()[-4000:]
        assert run.parameters["new_dataset"] == url
    finally:
        stop_process_group(server)
    after = MlflowClient(mlflow_server).search_model_versions(f"name='{config.train.model_name}'")
    assert len(after) == len(before) + 1
    second = str(max(int(v.version) for v in after))

    jobs = [
        job
        for job in JobSubmissionClient(ray_cluster.dashboard_url).list_jobs()
        if (job.metadata or {}).get("ldm.model_name") == config.train.model_name
    ]
    assert [job.status for job in jobs] == [JobStatus.SUCCEEDED]
    assert "training.ray.driver" in jobs[0].entrypoint

    markdown = asyncio.run(_artifact_markdown())
    assert markdown.startswith(f"# Retrain: {config.train.model_name} v{second}")
    assert _markdown_field(markdown, "Dataset").startswith(f"`{url}`")
    assert "re-sharding skipped" in _markdown_field(markdown, "Dataset")  # used as published
    parent = f"{config.train.model_name}/{first_report.training.version}"
    assert _markdown_field(markdown, "Started from") == parent
    decision = _markdown_field(markdown, "Decision")
    promoted = decision.startswith("promoted")
    assert decision.split(" — ", 1)[1].startswith(("better: fd", "not better: fd"))
    for version in (first_report.training.version, second):  # both evaluated
        assert f"| v{version} |" in markdown

    with urllib.request.urlopen(f"{ray_cluster.dashboard_url}/api/serve/applications/") as r:
        app = json.loads(r.read())["applications"][config.train.model_name]
    assert app["source"] == "declarative" and app["status"] == "RUNNING"
    endpoint = _markdown_field(markdown, "Endpoint")
    with urllib.request.urlopen(f"{endpoint}/v1/model", timeout=30) as response:
        info = json.loads(response.read())
    assert str(info["version"]) == (second if promoted else first_report.training.version)
    grid = _markdown_field(markdown, "Sample grid").strip("`")
    assert Image.open(grid).size == Image.open(first_report.endpoint.grid).size
