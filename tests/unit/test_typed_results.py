"""The typed results of a retrain's stages and the settings they are built from: what
``ldm train`` and a retrain config resolve to, and the report page read from them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.report import DatasetSummary, Endpoint, RetrainReport, report_markdown
from training.evaluation.promotion import PromotionResult
from training.job import TrainedVersion, TrainSettings

METRICS = {"class_consistency": 0.9, "fd": 1.94, "psnr": 26.5, "seconds_per_image": 0.01}


def test_train_settings_resolve_to_the_job_the_driver_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = TrainSettings(preset="tiny", scaling={"num_workers": 2, "cpus_per_worker": 3})
    job = settings.job("s3://bucket/ds", run_prefix="retrain-")
    assert job.model.preset == "tiny" and job.data_url == "s3://bucket/ds"
    assert job.run_name.startswith("retrain-tiny-")
    assert job.storage_url == str(tmp_path / "runs")
    assert job.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (job.scaling.num_workers, job.scaling.torch_threads) == (2, 3)
    named = settings.model_copy(update={"run_name": "mine", "storage_url": "s3://r"}).job("/d")
    assert (named.run_name, named.storage_url) == ("mine", "s3://r")
    with pytest.raises(ValidationError, match="absolute path or s3://"):
        TrainSettings(storage_url="runs")


def test_the_report_page_reads_every_stage_result():
    report = RetrainReport(
        dataset=DatasetSummary(
            url="s3://b/ds",
            counts={"train": 90, "val": 10},
            resharded=False,
            num_classes=10,
            fingerprint="f",
        ),
        training=TrainedVersion(
            run_id="r" * 32, model_name="ldm", version="2", checkpoints={"autoencoder": "/c"}
        ),
        promotion=PromotionResult(
            promoted=True,
            candidate="2",
            champion_before="1",
            reason="better: fd 1.9 < 2.5",
            metrics={"1": METRICS | {"fd": 2.5}, "2": METRICS},
        ),
        tracking_uri="http://mlflow:5000",
        endpoint=Endpoint(url="http://127.0.0.1:8000", grid="/out/grid.png"),
    )
    assert report.model_name == "ldm" and report.metrics == METRICS
    page = report_markdown(report)
    assert page.startswith("# Retrain: ldm v2\n")
    assert "re-sharding skipped" in page and "promoted to @champion — better: fd" in page
    assert f"`{'r' * 32}` at `http://mlflow:5000`" in page and "`/out/grid.png`" in page
    assert "| v1 | 0.900 | 2.500 | 26.50 | 0.010 |" in page
    unserved = report_markdown(report.model_copy(update={"endpoint": None}))
    assert "**Endpoint**: not deployed" in unserved


def test_a_trained_version_round_trips_through_the_result_file_of_a_ray_job():
    version = TrainedVersion(
        run_id="r", model_name="ldm", version="3", checkpoints={"denoiser": "s3://c/d"}
    )
    assert TrainedVersion.model_validate_json(version.model_dump_json()) == version
    with pytest.raises(ValidationError):
        TrainedVersion(run_id="r", model_name="ldm", version="3", checkpoints={"vae": "/c"})
