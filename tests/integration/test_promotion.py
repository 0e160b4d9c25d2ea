"""Evaluation and promotion against a real MLflow server (sqlite, artifacts on S3)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from mlflow import MlflowClient

from data.mnist import MNIST_CLASS_NAMES, load_mnist
from training.evaluation.evaluator import get_evaluator
from training.evaluation.promotion import promote, rollback
from training.evaluation.scoring import EvaluationSettings
from training.latent_diffusion import LatentDiffusion
from training.local import train_in_process
from training.mlflow.registry import alias_version, log_model_version
from training.models import UNet
from training.presets import get_preset

pytestmark = pytest.mark.integration

EVALUATORS = "s3://ldm-runs/evaluators"
FAST = EvaluationSettings(samples_per_class=10, sampler="ddim", steps=10)


@pytest.fixture(scope="module")
def models() -> dict[str, LatentDiffusion]:
    """``good``: the tiny preset trained a little longer on MNIST; ``bad``: the same
    autoencoder with an untrained denoiser."""
    config = get_preset("tiny").for_data(32, 1, 10, MNIST_CLASS_NAMES)
    longer = {
        "autoencoder_training": config.autoencoder_training.model_copy(update={"steps": 300}),
        "denoiser_training": config.denoiser_training.model_copy(
            update={"steps": 400, "batch_size": 64, "ema_decay": 0.99}
        ),
    }
    images, labels = load_mnist()
    good = train_in_process(
        config.model_copy(update=longer), images, labels, progress=False, log=lambda _: None
    )
    torch.manual_seed(1)
    bad = LatentDiffusion(
        good.config, good.autoencoder, UNet(good.config.denoiser), good.classifier
    )
    return {"good": good, "bad": bad.eval()}


def _register(uri: str, data_url: str, name: str, model: LatentDiffusion) -> str:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("promotion") or client.get_experiment(
        client.create_experiment("promotion")
    )
    run = client.create_run(experiment.experiment_id, tags={"data.manifest_url": data_url})
    return log_model_version(model, uri, run.info.run_id, name).version


def test_evaluator_is_accurate_on_held_out_digits_and_cached(mnist_url):
    evaluator = get_evaluator(mnist_url, EVALUATORS)
    assert evaluator.heldout_accuracy > 0.95
    started = time.perf_counter()
    again = get_evaluator(mnist_url, EVALUATORS)
    assert time.perf_counter() - started < 5
    assert again.heldout_accuracy == evaluator.heldout_accuracy
    assert again.manifest_sha256 == evaluator.manifest_sha256


def test_promotion_lifecycle(mlflow_server, mnist_url, models):
    name, client = "lifecycle", MlflowClient(mlflow_server)

    bad = _register(mlflow_server, mnist_url, name, models["bad"])
    first = promote(name, mlflow_server, EVALUATORS, settings=FAST)
    assert first.promoted and "no @champion" in first.reason
    assert alias_version(client, name, "champion") == bad
    version = client.get_model_version(name, bad)
    assert version.tags["promotion.decision"] == "promoted"
    for key in ("eval.fd", "eval.class_consistency", "eval.psnr", "eval.seconds_per_image"):
        assert key in version.tags

    good = _register(mlflow_server, mnist_url, name, models["good"])
    better = promote(name, mlflow_server, EVALUATORS, settings=FAST)
    assert better.promoted, better.reason
    assert better.metrics[good]["fd"] < better.metrics[bad]["fd"]
    assert alias_version(client, name, "champion") == good
    assert alias_version(client, name, "previous") == bad
    assert client.get_model_version(name, bad).tags["promotion.decision"] == "replaced"
    # the exposure bias: a number and its curve over the 10 DDIM steps, on the version
    # and in its run (a metric per timestep, and a plot)
    tags = client.get_model_version(name, good).tags
    curve = json.loads(tags["eval.exposure_ratio"])
    assert len(curve) == 10 and [t for t, _ in curve] == sorted((t for t, _ in curve), reverse=True)
    assert float(tags["eval.exposure_bias"]) == pytest.approx(
        sum(r - 1 for _, r in curve) / 10, abs=1e-3
    )
    run_id = client.get_model_version(name, good).run_id
    history = client.get_metric_history(run_id, f"eval/exposure_ratio_v{good}")
    assert sorted(m.step for m in history) == sorted(t for t, _ in curve)
    logged = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert f"eval/exposure_v{good}.png" in logged

    worse = _register(mlflow_server, mnist_url, name, models["bad"])
    refused = promote(name, mlflow_server, EVALUATORS, settings=FAST)
    assert not refused.promoted and refused.reason.startswith("not better: fd")
    assert alias_version(client, name, "champion") == good
    tags = client.get_model_version(name, worse).tags
    assert tags["promotion.decision"] == "kept" and "not better" in tags["promotion.reason"]
    assert "kept against candidate" in client.get_model_version(name, good).tags["promotion.reason"]

    before, after = rollback(name, mlflow_server)
    assert (before, after) == (good, bad)
    assert alias_version(client, name, "champion") == bad
    assert alias_version(client, name, "previous") is None
    with pytest.raises(ValueError, match="no @previous version"):
        rollback(name, mlflow_server)


def test_racing_promotions_end_with_one_winner(mlflow_server, mnist_url, models):
    name, client = "race", MlflowClient(mlflow_server)
    versions = [_register(mlflow_server, mnist_url, name, models["good"]) for _ in range(2)]
    results = {}

    def run(version: str) -> None:
        results[version] = promote(name, mlflow_server, EVALUATORS, version=version, settings=FAST)

    threads = [threading.Thread(target=run, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [v for v, r in results.items() if r.promoted]
    losers = [r for r in results.values() if not r.promoted]
    assert len(winners) == 1 and len(losers) == 1
    assert losers[0].lost_race and "lost a race" in losers[0].reason
    assert alias_version(client, name, "champion") == winners[0]
    assert alias_version(client, name, "previous") is None
    assert client.search_registered_models(f"name = '{name}.promotion-lock'") == []


def test_evaluate_searches_epsilon_scaling_and_the_endpoint_defaults_to_it(
    mlflow_server, mnist_url, models, capsys
):
    from flows.cli import main as ldm
    from serving.model_store import ModelStore
    from serving.schemas import RequestLimits, SampleRequest
    from training.mlflow.model_uri import parse_model_uri
    from training.mlflow.tracking import EPS_SCALING_TAG

    name = "eps-search"
    version = _register(mlflow_server, mnist_url, name, models["good"])
    argv = ["evaluate", f"models:/{name}/{version}", "--tracking-uri", mlflow_server]
    argv += ["--evaluator-cache", EVALUATORS, "--samples-per-class", "5", "--steps", "5"]
    argv += ["--search-eps-scaling", "--eps-cells", "ddim5", "--eps-scales", "0.9,0.98"]
    assert ldm(argv) == 0
    out = capsys.readouterr().out
    assert f"epsilon scaling kept with v{version} (tag {EPS_SCALING_TAG})" in out
    table = json.loads(
        MlflowClient(mlflow_server).get_model_version(name, version).tags[EPS_SCALING_TAG]
    )
    assert set(table) == {"ddim"} and set(table["ddim"]) == {"5"}
    # the chosen b is the one whose FD the command printed as lowest
    for steps, line in (("5", "ddim 5 steps"),):
        (printed,) = [row for row in out.splitlines() if row.strip().startswith(line)]
        fds = {
            float(cell.split(":")[0]): float(cell.split("fd ")[1].split()[0])
            for cell in printed.split("(", 1)[1].rstrip(")").split(", ")
        }
        assert set(fds) == {0.9, 0.98, 1.0} and table["ddim"][steps] == min(fds, key=fds.get)

    loaded = ModelStore(parse_model_uri(f"models:/{name}/{version}"), mlflow_server).load(version)
    limits = RequestLimits.for_model(
        ("0",) * 10, 10, 1000, 8, 50, 10, 10, 10, eps_defaults=loaded.eps_defaults
    )
    plain = SampleRequest.model_validate_json('{"label": 1, "steps": 5}', context=limits)
    assert plain.to_job(limits).eps_scaling == table["ddim"]["5"]  # the version's b
    asked = SampleRequest.model_validate_json('{"label": 1, "eps_scaling": 1.0}', context=limits)
    assert asked.to_job(limits).eps_scaling == 1.0  # a request's own b wins
    other = SampleRequest.model_validate_json('{"label": 1, "sampler": "ddpm"}', context=limits)
    assert other.to_job(limits).eps_scaling == 1.0  # not searched for this sampler: off
