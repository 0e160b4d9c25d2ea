"""Ray Train jobs end to end on a two-node Ray cluster, with data and checkpoints on
the S3 server and tracking in a real MLflow server."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import ray.train
import torch
from mlflow import MlflowClient

from data import storage
from training.checkpoints import load_checkpoint_uri
from training.job import ScalingSettings, TrainJobConfig
from training.launch import fit_stage, run_training
from training.presets import get_preset
from training.ray_loop import WORKERS_FOLDER
from training.registry import load_model_version

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL_NAME = "ldm-it"


def _job(mnist_url: str, tracking_uri: str, run_name: str, **changes) -> TrainJobConfig:
    values = dict(
        data_url=mnist_url,
        model=get_preset("tiny"),
        scaling=ScalingSettings(num_workers=2, placement_strategy="STRICT_SPREAD"),
        storage_url="s3://ldm-runs/jobs",
        run_name=run_name,
        experiment="integration",
        model_name=MODEL_NAME,
        tracking_uri=tracking_uri,
        checkpoint_every=10,
        loader_workers=0,
    )
    return TrainJobConfig(**(values | changes))


@pytest.fixture(scope="module")
def trained(ray_cluster, mlflow_server, mnist_url):
    job = _job(mnist_url, mlflow_server, "e2e")
    return job, run_training(job)


def _worker_records(checkpoint_uri: str) -> list[dict]:
    with ray.train.Checkpoint(checkpoint_uri).as_directory() as folder:
        files = sorted((Path(folder) / WORKERS_FOLDER).glob("rank-*.json"))
        return [json.loads(f.read_text()) for f in files]


def test_every_stage_ran_on_both_nodes(trained):
    job, result = trained
    for stage, uri in result.checkpoints.items():
        assert uri.startswith("s3://ldm-runs/jobs/e2e-"), uri
        records = _worker_records(uri)
        assert [r["rank"] for r in records] == [0, 1], stage
        assert len({r["node_id"] for r in records}) == 2, stage
        steps = getattr(job.model, f"{stage}_training").steps
        assert all(r["steps"] == steps for r in records)


def test_mlflow_run_holds_params_tags_metrics_and_grids(trained, mlflow_server, mnist_url):
    job, result = trained
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    params, tags = run.data.params, run.data.tags
    assert run.info.status == "FINISHED"
    assert params["model.denoiser.model_channels"] == "16"
    assert params["model.diffusion.input_perturbation"] == "0.1"
    assert params["scaling.num_workers"] == "2"
    assert params["data_url"] == mnist_url
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert not any(secret in value for value in [*params.values(), *tags.values()])
    manifest = storage.read_bytes(f"{mnist_url}/manifest.json")
    assert tags["data.manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert tags["data.manifest_url"] == f"{mnist_url}/manifest.json"
    assert len(tags["git.commit"]) == 40
    assert json.loads(tags["ray.cluster_size"])["nodes"] == 2

    steps = job.model.denoiser_training.steps
    every = job.model.denoiser_training.log_every
    for name in ("loss", "learning_rate", "grad_norm", "images_per_s", "epoch"):
        history = client.get_metric_history(result.run_id, f"denoiser/{name}")
        assert [m.step for m in history] == list(range(every, steps + 1, every)), name
    assert all(
        m.value > 0 for m in client.get_metric_history(result.run_id, "denoiser/images_per_s")
    )
    assert client.get_metric_history(result.run_id, "classifier/accuracy")
    grids = [a.path for a in client.list_artifacts(result.run_id, "samples")]
    assert f"samples/denoiser_step_{steps:07d}.png" in grids


def test_registered_candidate_reloads_and_samples_exactly(trained, mlflow_server):
    _, result = trained
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias(MODEL_NAME, "candidate")
    assert version.version == result.model_version.version
    assert version.run_id == result.run_id
    loaded = load_model_version(f"models:/{MODEL_NAME}@candidate", mlflow_server)
    assert loaded.config == result.model.config
    assert loaded.config.autoencoder.scale_factor != 1.0
    y = torch.tensor([0, 3, 7, 9])
    settings = dict(guidance_scale=2.0, classifier_scale=1.0, sampler="ddim", steps=10)

    def draw(model):
        gens = [torch.Generator().manual_seed(s) for s in range(4)]
        return model.sample(y, generator=gens, **settings)

    torch.testing.assert_close(draw(loaded), draw(result.model), rtol=0, atol=0)


def test_a_killed_worker_resumes_from_the_last_checkpoint(
    ray_cluster, mlflow_server, mnist_url, tmp_path
):
    model = get_preset("tiny")
    model = model.model_copy(
        update={
            "autoencoder_training": model.autoencoder_training.model_copy(update={"steps": 300})
        }
    )
    job = _job(
        mnist_url, mlflow_server, "killed", model=model, storage_url=str(tmp_path),
        scaling=ScalingSettings(num_workers=2), checkpoint_every=20, max_failures=2,
    )  # fmt: skip
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("integration") or client.get_experiment(
        client.create_experiment("integration")
    )
    run_id = client.create_run(experiment.experiment_id).info.run_id
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(tmp_path, killed))
    killer.start()
    uri = fit_stage(job, "autoencoder", mnist_url, run_id)
    killer.join()
    assert killed, "no worker was killed"
    resumed = client.get_metric_history(run_id, "autoencoder/resumed_from_step")
    assert len(resumed) == 1 and 20 <= resumed[0].value < 300
    assert all(r["steps"] == 300 for r in _worker_records(uri))

    # Running the same run name again resumes from its final checkpoint: no more steps.
    again = fit_stage(job, "autoencoder", mnist_url, run_id)
    resumed = client.get_metric_history(run_id, "autoencoder/resumed_from_step")
    assert sorted(m.value for m in resumed)[-1] == 300
    assert again == uri


def test_one_node_run_matches_the_two_node_run(trained, mlflow_server, mnist_url):
    """The same stage on one worker: same parameter shapes, and both runs converge."""
    job, result = trained
    single = _job(mnist_url, mlflow_server, "single", scaling=ScalingSettings(num_workers=1))
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("integration")
    run_id = client.create_run(experiment.experiment_id).info.run_id
    uri = fit_stage(single, "autoencoder", mnist_url, run_id)
    records = _worker_records(uri)
    assert [r["rank"] for r in records] == [0]
    one_node, _ = load_checkpoint_uri(uri)
    two_nodes, _ = load_checkpoint_uri(result.checkpoints["autoencoder"])
    assert {k: v.shape for k, v in one_node.model.items()} == {
        k: v.shape for k, v in two_nodes.model.items()
    }
    for run in (run_id, result.run_id):
        losses = [m.value for m in client.get_metric_history(run, "autoencoder/loss")]
        assert losses[-1] < 0.8 * losses[0], losses


def _kill_a_worker_after_first_checkpoint(storage_dir: Path, killed: list[int]) -> None:
    """SIGKILL one training worker once the controller has registered a checkpoint
    (its snapshot in storage lists one): only registered checkpoints are resumed from."""
    snapshot = storage_dir / "killed-autoencoder" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if snapshot.is_file() and "checkpoint_" in snapshot.read_text():
            break
        time.sleep(0.2)
    for process in psutil.process_iter(["pid", "cmdline"]):
        if "ray::RayTrainWorker" in " ".join(process.info["cmdline"] or []):
            os.kill(process.info["pid"], signal.SIGKILL)
            killed.append(process.info["pid"])
            return
