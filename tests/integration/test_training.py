"""Ray Train jobs end to end on a two-node Ray cluster, with data and checkpoints on
the S3 server and tracking in a real MLflow server."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import ray
import ray.train
import torch
from mlflow import MlflowClient

from data import storage
from data.manifest import load_manifest
from training.checkpoints import (
    load_checkpoint,
    load_checkpoint_uri,
)
from training.job import ScalingSettings, TrackingSettings, TrainJobConfig
from training.mlflow.checkpoint_artifacts import logged_checkpoints
from training.mlflow.registry import load_model_version
from training.optimisation import NonFiniteLoss, cpu_has_native_bf16, lr_factor
from training.presets import get_preset
from training.ray.driver import check_worker_room, fit_stage, run_training, worker_group_name
from training.ray.placement import Unplaceable
from training.ray.worker import WORKERS_FOLDER
from training.stages import STAGE_NAMES

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


@dataclass
class Outage:
    stopped_at: float = 0.0
    restarted_at: float = 0.0


def _wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _stop_tracking_during_the_denoiser(mlflow_process, job: TrainJobConfig, outage: Outage):
    """Stop the tracking server once the worker group has registered the denoiser's
    first checkpoint (step 50 of 400), and start it again (same port) 20 s later: far
    longer than the workers' client retries, and the rest of the denoiser stage is
    logged while it is down. The trigger is the group's own record in storage, not what
    MLflow has received: the `tiny` denoiser stage takes seconds, about as long as
    polling the server can lag behind training."""
    snapshot = f"{job.storage_url}/{worker_group_name(job, STAGE_NAMES)}/{SNAPSHOT}"
    _wait_for(lambda: _registered(snapshot, "denoiser"), "the first denoiser checkpoint")
    mlflow_process.stop()
    outage.stopped_at = time.time()
    try:
        time.sleep(20)
    finally:  # whatever happened, the server comes back
        mlflow_process.start()
        outage.restarted_at = time.time()


@pytest.fixture(scope="module")
def trained(ray_cluster, mlflow_process, mnist_url):
    """The e2e run, with the tracking server down for 20 s from the denoiser stage's
    first checkpoint."""
    quick_to_fail = TrackingSettings(request_timeout_s=5, request_retries=0, outage_budget_s=300)
    tiny = get_preset("tiny")  # its denoiser in bf16 (where the CPU has it), cosine decay,
    # long enough (about 25 s) to be still training when the tracking server stops: the
    # storage record of its first checkpoint (step 50) was seen up to 10 s after the step
    denoiser = tiny.denoiser_training.model_copy(
        update={"precision": "bf16", "lr_decay": "cosine", "steps": 400}
    )
    job = _job(
        mnist_url,
        mlflow_process.url,
        "e2e",
        model=tiny.model_copy(update={"denoiser_training": denoiser}),
        tracking=quick_to_fail,
        mlflow_checkpoints="last:1",
        checkpoint_every=50,
    )
    outage = Outage()
    stopper = threading.Thread(
        target=_stop_tracking_during_the_denoiser, args=(mlflow_process, job, outage)
    )
    stopper.start()
    result = run_training(job)
    stopper.join()
    return job, result, outage


def _worker_records(checkpoint_uri: str) -> list[dict]:
    with ray.train.Checkpoint(checkpoint_uri).as_directory() as folder:
        files = sorted((Path(folder) / WORKERS_FOLDER).glob("rank-*.json"))
        return [json.loads(f.read_text()) for f in files]


def test_every_stage_ran_on_both_nodes(trained):
    job, result, _ = trained
    for stage, uri in result.checkpoints.items():
        assert uri.startswith("s3://ldm-runs/jobs/e2e-"), uri
        records = _worker_records(uri)
        assert [r["rank"] for r in records] == [0, 1], stage
        assert len({r["node_id"] for r in records}) == 2, stage
        steps = getattr(job.model, f"{stage}_training").steps
        assert all(r["steps"] == steps for r in records)


def test_mlflow_run_holds_params_tags_metrics_and_grids(trained, mlflow_server, mnist_url):
    job, result, _ = trained
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
    training = job.model.denoiser_training  # warm-up, then the cosine down to zero
    rates = client.get_metric_history(result.run_id, "denoiser/learning_rate")
    assert [m.value for m in rates] == pytest.approx(
        [training.learning_rate * lr_factor(training, m.step) for m in rates]
    )
    assert rates[-1].value < 0.05 * training.learning_rate
    # bf16 autocast where asked for and native to the CPU, fp32 elsewhere
    for stage, bf16 in (("autoencoder", False), ("denoiser", cpu_has_native_bf16())):
        (flag,) = client.get_metric_history(result.run_id, f"{stage}/bf16_autocast")
        assert flag.value == float(bf16), stage
    assert client.get_metric_history(result.run_id, "classifier/accuracy")
    # the grid is an image series (a step slider in the MLflow UI), rows named by class
    grids = [a.path for a in client.list_artifacts(result.run_id, "images")]
    final = [p for p in grids if p.startswith(f"images/samples~denoiser+step+{steps}+")]
    assert any(p.endswith(".png") for p in final), grids
    # the dataset is the run's input: the manifest's URL, digest and profile
    (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
    digest = tags["data.manifest_sha256"]
    assert dataset.digest == digest[:36] and json.loads(dataset.profile)["sha256"] == digest
    assert json.loads(dataset.source) == {"uri": f"{mnist_url}/manifest.json"}
    assert json.loads(dataset.profile)["counts"]["train"] > 0


def test_every_stage_logged_its_newest_checkpoints_to_the_run(trained, mlflow_server, tmp_path):
    """checkpoints/STAGE/step-N/ in the MLflow run (here only the newest is kept: the
    older one was deleted through the tracking server), safetensors and JSON only, with
    the weights of the stage's final checkpoint in storage. The denoiser's first one was
    logged while the tracking server was down."""
    import mlflow

    job, result, _ = trained
    client = MlflowClient(mlflow_server)
    for stage, uri in result.checkpoints.items():
        steps = getattr(job.model, f"{stage}_training").steps
        folders = logged_checkpoints(client, result.run_id, f"checkpoints/{stage}")
        newest = [f"checkpoints/{stage}/step-{steps:07d}"]
        assert folders == newest, stage
        local = mlflow.artifacts.download_artifacts(
            run_id=result.run_id,
            artifact_path=newest[-1],
            dst_path=str(tmp_path / stage),
            tracking_uri=mlflow_server,
        )
        names = {p.name for p in Path(local).rglob("*") if p.is_file()}
        assert all(n.endswith((".safetensors", ".json")) for n in names), names
        logged, logged_config = load_checkpoint(local)
        stored, stored_config = load_checkpoint_uri(uri)
        assert logged.step == stored.step == steps and logged_config == stored_config
        for name, tensor in stored.model.items():
            assert torch.equal(logged.model[name], tensor), (stage, name)


def test_the_run_outlived_a_tracking_outage_and_lost_nothing(trained, mlflow_server):
    """Metrics logged while the server was down were kept and sent after it came back,
    and the run still finished and registered its model."""
    job, result, outage = trained
    assert outage.stopped_at and outage.restarted_at - outage.stopped_at >= 20
    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(result.run_id, "denoiser/loss")
    during = [
        m for m in history if outage.stopped_at * 1000 < m.timestamp < outage.restarted_at * 1000
    ]
    assert during, (
        f"no metric was logged during the outage ({outage}); "
        f"logged at {[(m.step, m.timestamp / 1000) for m in history]}"
    )
    steps = job.model.denoiser_training.steps
    assert [m.step for m in history] == list(range(5, steps + 1, 5))
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert result.model_version.version is not None


def test_registered_candidate_reloads_and_samples_exactly(trained, mlflow_server):
    _, result, _ = trained
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


def test_a_stage_continues_from_a_checkpoint_logged_to_mlflow(trained, mlflow_server, mnist_url):
    """``--resume-from runs:/…/checkpoints/denoiser/step-N`` (the e2e run's last) with a
    budget of N + 10 denoiser steps: a new run takes the earlier run's autoencoder as it
    is, trains the denoiser from step N on (its optimiser and EMA restored) and the
    classifier, and
    records where it came from. A checkpoint already at the budget is refused before
    any run starts. The classifier draws its shards with replacement on both ranks."""
    job, result, _ = trained
    done = job.model.denoiser_training.steps
    source = f"runs:/{result.run_id}/checkpoints/denoiser/step-{done:07d}"
    at_budget = _job(mnist_url, mlflow_server, "resumed-too-far", resume_from=source)
    with pytest.raises(ValueError, match="give the stage more steps"):
        run_training(at_budget)
    tiny = get_preset("tiny")
    longer = tiny.model_copy(
        update={
            "denoiser_training": tiny.denoiser_training.model_copy(update={"steps": done + 10}),
            "classifier_training": tiny.classifier_training.model_copy(
                update={"steps": 10, "shard_sampling": "resampled"}
            ),
        }
    )
    resumed = run_training(
        _job(
            mnist_url,
            mlflow_server,
            "resumed",
            model=longer,
            model_name=f"{MODEL_NAME}-resumed",
            resume_from=source,
        )
    )
    client = MlflowClient(mlflow_server)
    run = client.get_run(resumed.run_id)
    assert run.data.tags["ldm.resumed_from"] == source
    assert run.data.tags["ldm.resumed_from.run_id"] == result.run_id
    assert "autoencoder/loss" not in run.data.metrics  # taken, not trained
    history = client.get_metric_history(resumed.run_id, "denoiser/loss")
    assert [m.step for m in history] == [done + 5, done + 10]
    assert run.data.metrics["denoiser/resumed_from_step"] == done
    assert len(client.get_metric_history(resumed.run_id, "classifier/loss")) == 2
    assert resumed.model.config.classifier_training.shard_sampling == "resampled"
    earlier, _ = load_checkpoint_uri(result.checkpoints["autoencoder"])
    taken, _ = load_checkpoint_uri(resumed.checkpoints["autoencoder"])
    assert all(torch.equal(taken.model[k], v) for k, v in earlier.model.items())
    assert (
        resumed.model.config.autoencoder.scale_factor
        == result.model.config.autoencoder.scale_factor
    )
    logged = {
        stage: logged_checkpoints(client, resumed.run_id, f"checkpoints/{stage}")[-1]
        for stage in ("autoencoder", "denoiser", "classifier")
    }
    assert logged == {
        "autoencoder": "checkpoints/autoencoder/step-0000020",
        "denoiser": f"checkpoints/denoiser/step-{done + 10:07d}",
        "classifier": "checkpoints/classifier/step-0000010",
    }
    assert resumed.model_version.run_id == resumed.run_id


def test_a_warm_start_begins_from_the_registered_weights(trained, mlflow_server, mnist_url):
    """``--init-from models:/NAME/V --reuse-autoencoder`` with a learning rate too small
    to move a weight: the new version is the registered one (the autoencoder taken as it
    is, with its latent scale; the denoiser and classifier fine-tuned from its weights),
    and the run and the version name their parent. A version that does not exist is
    refused before any run starts."""
    _, result, _ = trained
    missing = _job(mnist_url, mlflow_server, "warm-missing", init_from=f"models:/{MODEL_NAME}@nope")
    with pytest.raises(ValueError, match="has no alias @nope"):
        run_training(missing)
    parent = f"{MODEL_NAME}/{result.model_version.version}"
    tiny = get_preset("tiny")
    unmoving = {"steps": 5, "learning_rate": 1e-12, "warmup_steps": 0}
    model = tiny.model_copy(
        update={
            name: getattr(tiny, name).model_copy(update=unmoving)
            for name in ("denoiser_training", "classifier_training")
        }
    )
    warm = run_training(
        _job(
            mnist_url,
            mlflow_server,
            "warm",
            model=model,
            model_name=f"{MODEL_NAME}-warm",
            init_from=f"models:/{parent}",
            reuse_autoencoder=True,
        )
    )
    client = MlflowClient(mlflow_server)
    tags = client.get_run(warm.run_id).data.tags
    assert tags["ldm.init_from"] == f"models:/{parent}"
    assert tags["ldm.parent_version"] == parent
    assert tags["ldm.parent_version.run_id"] == result.run_id
    assert tags["ldm.reused_autoencoder"] == "true"
    version = client.get_model_version(f"{MODEL_NAME}-warm", warm.model_version.version)
    assert version.tags["ldm.parent_version"] == parent
    metrics = client.get_run(warm.run_id).data.metrics
    assert "autoencoder/loss" not in metrics and "denoiser/loss" in metrics
    assert warm.model.config.autoencoder == result.model.config.autoencoder  # the latent scale
    for name in ("autoencoder", "denoiser", "classifier"):
        ours, theirs = getattr(warm.model, name).state_dict(), getattr(result.model, name)
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-6, msg=f"{name}.{key}")
    assert logged_checkpoints(client, warm.run_id, "checkpoints/autoencoder") == [
        "checkpoints/autoencoder/step-0000020"
    ]


def test_a_killed_worker_resumes_from_the_last_checkpoint(
    ray_cluster, mlflow_server, mnist_url, tmp_path
):
    """Every stage in one worker group: a worker killed during the denoiser restarts the
    group from the denoiser's last checkpoint; the finished autoencoder is not trained
    again, its final checkpoint and the latents the ranks cached are found as they are."""
    model = get_preset("tiny")
    denoiser = model.denoiser_training.model_copy(update={"steps": 200})
    job = _job(
        mnist_url,
        mlflow_server,
        "killed",
        model=model.model_copy(update={"denoiser_training": denoiser}),
        model_name="ldm-it-killed",
        storage_url=str(tmp_path),
        scaling=ScalingSettings(num_workers=2),
        checkpoint_every=20,
        max_failures=2,
        mlflow_checkpoints="final",
    )
    snapshot = tmp_path / worker_group_name(job, STAGE_NAMES) / SNAPSHOT
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_a_worker_at_a_checkpoint, args=(snapshot, "denoiser", killed)
    )
    killer.start()
    result = run_training(job)
    killer.join()
    assert killed, "no worker was killed"
    client = MlflowClient(mlflow_server)
    resumed = client.get_metric_history(result.run_id, "denoiser/resumed_from_step")
    assert len(resumed) == 1 and 20 <= resumed[0].value < 200
    assert client.get_metric_history(result.run_id, "autoencoder/resumed_from_step") == []
    losses = client.get_metric_history(result.run_id, "autoencoder/loss")
    assert [m.step for m in losses] == [5, 10, 15, 20]  # trained once
    for stage, uri in result.checkpoints.items():
        steps = getattr(job.model, f"{stage}_training").steps
        assert all(r["steps"] == steps for r in _worker_records(uri)), stage
        state, _ = load_checkpoint_uri(uri)
        assert state.stage == stage and state.step == steps
    latents = load_manifest(str(tmp_path / "killed" / "latents"))
    assert latents.source.endswith(f"encoded by {result.checkpoints['autoencoder']}")
    assert latents.counts["train"] == load_manifest(mnist_url).counts["train"]

    # Running the same run name again finds every stage finished: no more steps.
    again = run_training(job)
    assert again.checkpoints == result.checkpoints
    for stage in STAGE_NAMES:
        assert client.get_metric_history(again.run_id, f"{stage}/loss") == [], stage


def test_one_node_run_matches_the_two_node_run(trained, mlflow_server, mnist_url):
    """The same stage on one worker: same parameter shapes, and both runs converge."""
    job, result, _ = trained
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


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints


def _registered(snapshot_url: str, stage: str, step: int | None = None) -> bool:
    """Whether Ray Train has registered a checkpoint of ``stage`` (at ``step``, if
    given): only registered ones are resumed from."""
    try:
        results = json.loads(storage.read_bytes(snapshot_url))["checkpoint_results"]
    except (FileNotFoundError, ValueError, KeyError):  # not written yet, or being written
        return False
    return any(
        r["metrics"].get("stage") == stage and step in (None, r["metrics"].get("step"))
        for r in results
    )


def _kill_a_worker_at_a_checkpoint(snapshot: Path, stage: str, killed: list[int]) -> None:
    """SIGKILL one training worker once the controller has registered a checkpoint of
    ``stage``."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not _registered(str(snapshot), stage):
        time.sleep(0.2)
    for process in psutil.process_iter(["pid", "cmdline"]):
        if "ray::RayTrainWorker" in " ".join(process.info["cmdline"] or []):
            os.kill(process.info["pid"], signal.SIGKILL)
            killed.append(process.info["pid"])
            return


def test_a_non_finite_loss_stops_the_stage_and_registers_nothing(
    ray_cluster, mlflow_server, mnist_url, tmp_path
):
    model = get_preset("tiny")
    exploding = model.autoencoder_training.model_copy(update={"learning_rate": 1e30})
    job = _job(
        mnist_url,
        mlflow_server,
        "nan",
        model=model.model_copy(update={"autoencoder_training": exploding}),
        model_name="ldm-it-nan",
        storage_url=str(tmp_path),
    )
    with pytest.raises(NonFiniteLoss, match="autoencoder stage's loss is not finite") as caught:
        run_training(job)
    assert 1 <= caught.value.step <= exploding.log_every  # found at the first check
    client = MlflowClient(mlflow_server)
    assert client.search_registered_models("name = 'ldm-it-nan'") == []
    (run,) = client.search_runs(
        [client.get_experiment_by_name("integration").experiment_id], "tags.`ldm.run_name` = 'nan'"
    )
    assert run.info.status == "FAILED"
    assert not list(tmp_path.glob("nan-autoencoder/checkpoint_*"))  # none after the bad step


def test_a_workers_error_that_says_what_to_fix_stops_the_job_as_itself(
    ray_cluster, mlflow_server, tmp_path
):
    """Shards listed in the manifest but gone: each rank's loader raises a StorageError
    that names the shard and what to do; the job raises it as itself (the command
    prints it, the retrain flow does not retry it), not Ray Train's wrapper."""
    import numpy as np

    from data.manifest import ShardOptions
    from data.shard import shard_dataset

    images = np.random.default_rng(0).integers(0, 256, (80, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "src.npz", images=images, labels=np.arange(80) % 4)
    options = ShardOptions(image_size=16, channels=1, shard_max_samples=20, val_fraction=0.0)
    shard_dataset(str(tmp_path / "src.npz"), str(tmp_path / "ds"), options, progress=False)
    for shard in (tmp_path / "ds").glob("train-*.tar"):
        shard.unlink()
    job = _job(
        str(tmp_path / "ds"),
        mlflow_server,
        "gone",
        storage_url=str(tmp_path / "runs"),
        max_failures=0,
    )
    with pytest.raises(storage.StorageError, match="listed in the manifest but missing") as caught:
        run_training(job)
    assert isinstance(caught.value.__cause__, ray.train.WorkerGroupError)
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("integration").experiment_id], "tags.`ldm.run_name` = 'gone'"
    )
    assert run.info.status == "FAILED"


def test_workers_no_node_can_hold_fail_at_once_saying_what_to_change(
    ray_cluster, mlflow_server, mnist_url, tmp_path, monkeypatch, caplog
):
    """The session's cluster (nodes of 2 CPUs, started without an autoscaling config,
    as `ldm up` starts one) never holds a worker of 3 CPUs; Ray Train would retry the
    start of its worker group every minute for good. The job fails before its MLflow
    run and before Ray Train, as a setting to change."""
    import training.ray.placement as placement

    job = _job(
        mnist_url,
        mlflow_server,
        "too-big",
        scaling=ScalingSettings(cpus_per_worker=3),
        storage_url=str(tmp_path),
    )
    started = time.monotonic()
    with pytest.raises(Unplaceable) as caught:
        run_training(job)
    assert time.monotonic() - started < 20
    assert str(caught.value).startswith(
        "a training worker needs 3 CPU; no node of the Ray cluster has that (its nodes: 2 CPU"
    )
    assert str(caught.value).endswith(
        "; this cluster adds no nodes; set --cpus-per-worker to at most 2, or start the "
        "cluster with larger nodes (ldm up --head-cpus, --worker-cpus)"
    )
    spread = ScalingSettings(num_workers=3, cpus_per_worker=1, placement_strategy="STRICT_SPREAD")
    own = "^3 training workers need 1 CPU each on nodes of their own; .*; use fewer --workers, or"
    with pytest.raises(Unplaceable, match=own):
        run_training(job.model_copy(update={"scaling": spread}))
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("integration")
    if experiment is not None:
        assert not client.search_runs([experiment.experiment_id], "tags.`ldm.run_name` = 'too-big'")
    assert not list(tmp_path.iterdir())

    # A cluster that may grow gets the demand (its autoscaler adds nodes for it) and a
    # warning with the reason.
    monkeypatch.setattr(placement, "cluster_can_grow", lambda: True)
    with caplog.at_level("WARNING", logger="training.ray.driver"):
        check_worker_room(job.scaling)
    assert "a training worker needs 3 CPU" in caplog.text
    assert "Ray Train waits for the cluster to add nodes" in caplog.text


def test_no_secret_reaches_rays_logs_or_mlflow(trained, ray_cluster, mlflow_server):
    """Runs last in the session's cluster: every job, app and training run is done."""
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    logs = [p for p in Path(ray_cluster.session_dir, "logs").rglob("*") if p.is_file()]
    assert any(p.name == "runtime_env_agent.log" for p in logs)  # there was much to search
    assert [str(p) for p in logs if secret in p.read_bytes()] == []
    client = MlflowClient(mlflow_server)
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiments, max_results=500):
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not any(secret.decode() in value for value in values), run.info.run_id
