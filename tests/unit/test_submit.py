"""Which addresses submit a Ray Job, and what a remote cluster cannot reach."""

from __future__ import annotations

import pytest

from training.job import TrainJobConfig
from training.presets import get_preset
from training.ray.submit import check_reachable_from_cluster, is_job_address, submit_training


def _job(**values) -> TrainJobConfig:
    base = dict(
        data_url="s3://data/mnist",
        model=get_preset("tiny"),
        storage_url="s3://runs",
        run_name="r1",
        tracking_uri="http://mlflow:5000",
    )
    return TrainJobConfig(**(base | values))


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("http://head:8265", True),
        ("https://ray.example.com", True),
        ("head:6379", False),
        ("auto", False),
        ("ray://head:10001", False),
        (None, False),
        ("", False),
    ],
)
def test_only_dashboard_urls_submit_jobs(address, expected):
    assert is_job_address(address) is expected


def test_a_remote_cluster_needs_shared_storage_and_an_mlflow_server():
    check_reachable_from_cluster(_job(), "http://head:8265")
    with pytest.raises(ValueError, match="storage, data and MLflow tracking URI"):
        check_reachable_from_cluster(
            _job(data_url="/data/mnist", storage_url="/runs", tracking_uri="sqlite:////x.db"),
            "http://head:8265",
        )


def test_a_cluster_on_this_machine_may_use_local_folders():
    local = _job(data_url="/data/mnist", storage_url="/runs", tracking_uri="sqlite:////x.db")
    check_reachable_from_cluster(local, "http://127.0.0.1:8265")


def test_a_non_finite_loss_recorded_by_a_jobs_driver_is_raised_as_itself(tmp_path):
    from training.optimisation import NonFiniteLoss
    from training.ray.submit import raise_recorded_failure

    raise_recorded_failure(str(tmp_path / "missing.json"))  # no record: nothing to say
    record = tmp_path / "result.json"
    record.write_text('{"nonfinite": {"stage": "denoiser", "step": 35}}')
    with pytest.raises(NonFiniteLoss, match="denoiser stage's loss is not finite .* step 35"):
        raise_recorded_failure(str(record))


def test_a_local_dataset_without_a_manifest_fails_before_any_job_is_submitted(tmp_path):
    # no dashboard answers at this address: the error must come before any call to it
    job = _job(data_url=str(tmp_path / "missing"), storage_url=str(tmp_path / "runs"))
    with pytest.raises(FileNotFoundError, match="no manifest at .*missing/manifest.json"):
        submit_training(job, "http://127.0.0.1:9")


@pytest.mark.parametrize(
    ("workers", "changes", "message"),
    [
        (2, {}, "autoencoder stage cannot start on 2 worker.s.: the train split has 1 shards"),
        (1, {"denoiser_training": {"batch_size": 64}}, "denoiser stage cannot start on 1 wor"),
    ],
)
def test_a_dataset_too_small_for_the_job_fails_before_ray_or_mlflow_start(
    tmp_path, monkeypatch, workers, changes, message
):
    import numpy as np

    from data.manifest import ShardOptions
    from data.shard import shard_dataset
    from training.config import LDMConfig
    from training.presets import over_preset
    from training.ray import driver

    monkeypatch.setattr(driver, "connect_ray", lambda *_: pytest.fail("Ray was reached"))

    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "src.npz", images=images, labels=np.arange(40) % 4)
    options = ShardOptions(image_size=8, channels=1, shard_max_samples=100, val_fraction=0.0)
    shard_dataset(str(tmp_path / "src.npz"), str(tmp_path / "ds"), options, progress=False)
    job = _job(
        data_url=str(tmp_path / "ds"),
        storage_url=str(tmp_path / "runs"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        model=LDMConfig.model_validate(over_preset(changes, "tiny")),
        scaling={"num_workers": workers},
    )
    with pytest.raises(ValueError, match=message):
        driver.run_training(job)
    assert not (tmp_path / "mlflow.db").exists()


def test_a_workers_stated_error_is_raised_as_itself_and_a_bug_keeps_ray_trains_wrapper():
    from ray.train import WorkerGroupError

    from data.storage import StorageError
    from training.ray.driver import stated_failure

    gone = StorageError("shard train-000001.tar is listed in the manifest but missing")
    assert (
        stated_failure(WorkerGroupError("…", {1: ValueError("lower batch_size"), 0: gone})) is gone
    )
    assert stated_failure(WorkerGroupError("…", {0: gone, 1: KeyError("a bug")})) is None


def _failures():
    from data.storage import PermanentStorageError
    from training.optimisation import NonFiniteLoss
    from training.ray.placement import Unplaceable

    return [
        NonFiniteLoss("denoiser", 35),
        Unplaceable("a training worker needs 3 CPU"),
        ValueError("a rank gets fewer than batch_size=64 train samples"),
        PermanentStorageError("bucket 'ldm-runs' does not exist"),
    ]


@pytest.mark.parametrize("error", _failures(), ids=lambda e: type(e).__name__)
def test_what_a_jobs_driver_records_its_submitter_raises_as_itself(tmp_path, error):
    import json

    from training.ray.driver import failure_record
    from training.ray.submit import raise_recorded_failure

    record = tmp_path / "result.json"
    record.write_text(json.dumps(failure_record(error)))
    with pytest.raises(type(error)) as caught:
        raise_recorded_failure(str(record))
    assert type(caught.value) is type(error) and str(caught.value) == str(error)
