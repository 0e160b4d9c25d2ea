"""The Serve app's arguments: parsing, defaults, errors, deployment options; and the
serving package loading without Prefect or Ray Train."""

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.config import AppConfig
from training.mlflow.model_uri import ModelRef, parse_model_uri


def test_model_uris_by_alias_or_version():
    assert parse_model_uri("models:/ldm@champion") == ModelRef("ldm", alias="champion")
    assert parse_model_uri("models:/ldm/3") == ModelRef("ldm", version="3")
    assert ModelRef("ldm", alias="champion").uri == "models:/ldm@champion"
    assert ModelRef("ldm", alias="champion").version_uri("4") == "models:/ldm/4"
    for bad in ("runs:/abc/model", "models:/ldm", "models:/ldm/latest", "ldm@champion"):
        with pytest.raises(ValueError, match="models:/NAME@ALIAS"):
            parse_model_uri(bad)


def test_defaults_give_one_cpu_replica_following_the_champion_with_a_bounded_queue():
    config = AppConfig()
    assert config.model_uri == "models:/ldm@champion"
    options = config.deployment_options()
    assert options == {
        "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0.0},
        "max_ongoing_requests": 64,
        "max_queued_requests": 64,
        "backpressure_config": {"status_code": 503, "retry_after_s": 2},
        "num_replicas": 1,
    }
    assert (config.max_evaluations_per_request, config.request_timeout_s) == (16_384, 120.0)
    assert (config.resolved_device, config.resolved_torch_threads) == ("cpu", 1)
    assert config.resolved_default_steps == 50


def test_serve_run_strings_are_parsed():
    config = AppConfig.model_validate(
        {
            "model_uri": "models:/digits/2",
            "autoscaling_config": '{"min_replicas": 1, "max_replicas": 3}',
            "num_gpus": "0.5",
            "max_rows_per_forward": "32",
            "max_steps": "20",
        }
    )
    options = config.deployment_options()
    assert options["autoscaling_config"]["max_replicas"] == 3
    assert "num_replicas" not in options
    assert options["max_ongoing_requests"] == 64
    assert options["ray_actor_options"]["num_gpus"] == 0.5
    assert config.resolved_device == "cuda"
    assert config.resolved_default_steps == 20
    assert config.resolved_max_rows_per_forward == 32


def test_rows_per_forward_default_to_the_device():
    assert AppConfig().resolved_max_rows_per_forward == 64
    assert AppConfig(num_gpus=1).resolved_max_rows_per_forward == 256
    graphed = AppConfig(num_gpus=1, batch_invariant=True, cuda_graph=True).engine_settings()
    assert (graphed.batch_invariant, graphed.cuda_graph, graphed.deterministic) == (True,) * 3


def test_the_decode_width_reaches_the_engine():
    from serving.scheduler import DECODE_WIDTH  # the app's default is the scheduler's

    assert AppConfig().engine_settings().decode_width == DECODE_WIDTH
    assert AppConfig(decode_width=8).engine_settings().decode_width == 8


@pytest.mark.parametrize(
    ("values", "invariant", "graph"),
    [
        ({}, False, False),  # a CPU replica: unpadded, no graph
        ({"batch_invariant": True}, True, False),
        ({"num_gpus": 1}, True, True),  # a GPU replica: padded and graphed by default
        ({"num_gpus": 0.5, "cuda_graph": False}, True, False),
        ({"num_gpus": 1, "batch_invariant": False}, False, False),
        ({"num_gpus": 1, "device": "cpu"}, False, False),
    ],
)
def test_a_gpu_replica_runs_batch_invariant_and_graphed_by_default(values, invariant, graph):
    settings = AppConfig.model_validate(values).engine_settings()
    assert (settings.batch_invariant, settings.cuda_graph) == (invariant, graph)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model_uri": "runs:/x/model"}, "models:/NAME@ALIAS"),
        ({"num_replicas": 2, "autoscaling_config": {"max_replicas": 2}}, "not both"),
        ({"num_replicas": 0}, "num_replicas must be >= 1"),
        ({"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}, "must not exceed"),
        ({"autoscaling_config": "{max"}, "not valid JSON"),
        ({"max_steps": 10, "default_steps": 20}, "default_steps (20) must not exceed"),
        ({"device": "cuda"}, "needs num_gpus > 0"),
        ({"max_rows_per_forward": 0}, "greater than or equal to 1"),
        ({"decode_width": 0}, "greater than or equal to 1"),
        ({"max_batch": 8}, "Extra inputs"),
        ({"cuda_graph": True, "num_gpus": 1, "batch_invariant": False}, "needs batch_invariant"),
        ({"cuda_graph": True}, "needs a GPU replica: set num_gpus"),
        ({"cuda_graph": True, "batch_invariant": True}, "needs a GPU replica: set num_gpus"),
    ],
)
def test_bad_arguments_say_what_to_fix(values, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AppConfig.model_validate(values)


def test_serving_imports_without_prefect_or_ray_train():
    code = (
        "import sys\n"
        "import serving\n"
        "assert 'torch' not in sys.modules, 'import serving must stay light'\n"
        "import serving.app, serving.client, serving.schemas\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'"
        " or m == 'ray.train' or m.startswith('ray.train.'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_serve_config_file_is_valid_for_serve_and_the_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parents[2] / "infra" / "serve" / "serve_config.yaml"
    document = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(document)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "serving.app:build_app"
    config = AppConfig.model_validate(app.args)
    assert config.model_uri == "models:/ldm@champion"
    assert config.autoscaling_config is not None and config.resolved_max_ongoing_requests == 64


def test_serve_run_builds_the_app_from_string_arguments():
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from serving.app import build_app

    args = {
        "model_uri": "models:/digits@champion",
        "tracking_uri": "sqlite:////tmp/x.db",
        "num_replicas": "2",
        "max_rows_per_forward": "8",
        "max_ongoing_requests": "16",
        "num_cpus": "0.5",
    }
    app = call_user_app_builder_with_args_if_necessary(build_app, args)
    assert isinstance(app, Application)
    deployment = app._bound_deployment
    assert deployment.num_replicas == 2
    assert deployment.ray_actor_options["num_cpus"] == 0.5
    assert deployment.max_ongoing_requests == 16
    with pytest.raises(ValidationError, match="max_rows_per_forward"):
        call_user_app_builder_with_args_if_necessary(build_app, {"max_rows_per_forward": "zero"})


def test_a_remote_cluster_is_not_given_an_endpoint_bound_to_its_own_loopback():
    from serving.deploy import deploy_through_dashboard

    with pytest.raises(ValueError, match="out of reach from here"):
        deploy_through_dashboard(AppConfig(), "ldm", "http://10.1.2.3:8265", 8000)
