"""``ldm retrain`` / ``ldm schedule`` options → RetrainConfig, and the deployment that
``ldm schedule`` registers (built, not served)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from flows.cli import build_parser
from flows.cli.retrain import retrain_config_from_args
from flows.events import DATASET_EVENT, dataset_trigger
from flows.retrain_config import DEFAULTS
from flows.schedule import retrain_deployment


def _config(*argv: str):
    return retrain_config_from_args(build_parser().parse_args(["retrain", *argv]))


def test_no_options_give_the_embedded_defaults():
    assert _config() == DEFAULTS


def test_options_override_the_config_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "retrain.yaml"
    path.write_text(
        "train: {preset: tiny, model_name: digits}\n"
        "shard: {channels: 1, shard_max_samples: 600}\n"
        "evaluation: {samples_per_class: 10, steps: 10}\n"
        "serve: {app: {max_rows_per_forward: 4}}\n"
    )
    config = _config(
        "--config", str(path), "--model-name", "other", "--image-size", "16", "--port", "9000"
    )
    assert config.train.preset == "tiny" and config.train.model_name == "other"
    assert config.shard.image_size == 16 and config.shard.shard_max_samples == 600
    assert config.evaluation.samples_per_class == 10
    assert config.ray_address is None and config.serve.enabled
    assert (config.serve.port, config.serve.app.max_rows_per_forward) == (9000, 4)


def test_options_land_in_the_typed_sections_they_belong_to():
    config = _config("--workers", "2", "--cpus-per-worker", "4", "--no-serve", "--out", "/o")
    scaling = config.train.scaling
    assert (scaling.num_workers, scaling.cpus_per_worker, scaling.torch_threads) == (2, 4.0, 4)
    assert not config.serve.enabled and config.out_dir == "/o"
    assert config.shard.engine == "threads"
    on_ray = _config("--shard-on-ray", "--ray-address", "http://head:8265")
    assert on_ray.shard.engine == "ray" and on_ray.ray_address == "http://head:8265"
    assert on_ray.shard.options() == DEFAULTS.shard.options()  # the same dataset
    assert config.serve.app == DEFAULTS.serve.app  # the replicas' settings travel as they are
    assert _config().train.scaling.cpus_per_worker == 2.0  # the laptop default: both cores


def test_the_endpoint_model_is_the_retrains_own(tmp_path):
    path = tmp_path / "retrain.yaml"
    path.write_text("serve: {app: {model_uri: 'models:/other@champion'}}\n")
    with pytest.raises(ValidationError, match="set train.model_name"):
        _config("--config", str(path))


def test_a_bad_config_file_is_refused_with_the_field(tmp_path):
    path = tmp_path / "retrain.json"
    path.write_text(json.dumps({"train": {"preset": "huge"}}))
    with pytest.raises(ValidationError, match="preset"):
        _config("--config", str(path))
    with pytest.raises(ValueError, match="does not exist"):
        _config("--config", str(tmp_path / "missing.json"))


def test_deployment_carries_the_cron_schedule_trigger_and_config():
    config = _config("--preset", "tiny", "--no-serve")
    deployment = retrain_deployment(config, "weekly", cron="0 3 * * 1", on_new_dataset=True)
    assert deployment.name == "weekly"
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 3 * * 1" and schedule.schedule.timezone == "UTC"
    (trigger,) = deployment.triggers
    assert trigger.expect == {DATASET_EVENT}
    assert trigger.parameters == {"new_dataset": "{{ event.payload.dataset_url }}"}
    assert deployment.parameters["config"]["train"]["preset"] == "tiny"
    assert deployment.parameters["config"]["serve"]["enabled"] is False


def test_trigger_for_one_dataset_matches_only_its_resource():
    trigger = dataset_trigger("s3://bucket/digits/")
    assert trigger.match.model_dump() == {"prefect.resource.id": "ldm.dataset.s3://bucket/digits"}


@pytest.mark.parametrize("api_url", ["", "http://127.0.0.1:4200/api"])
def test_without_prefect_installed_a_dataset_is_not_announced_and_a_set_server_is_named(
    api_url,
):
    code = (
        "import sys\n"
        "sys.modules['prefect'] = None  # as in an image without Prefect\n"
        "from flows.events import emit_dataset_event\n"
        "print(emit_dataset_event('/data/digits', 'f' * 64, {'train': 9}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_API_URL"] = api_url
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "False"
    assert ("Prefect is not installed" in result.stderr) == bool(api_url)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "say when to retrain"),
        (["--cron", "61 3 * * 1"], "Invalid cron string"),
        (["--cron", "0 3 * * 1", "--preset", "huge"], "invalid choice"),
    ],
)
def test_schedule_refuses_what_it_cannot_run(argv, message):
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "schedule", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode in (1, 2), done.stdout
    assert message in done.stderr


def test_the_endpoint_binds_this_machine_only_unless_told_otherwise():
    assert _config().serve.host == "127.0.0.1"
    assert _config("--serve-host", "0.0.0.0").serve.host == "0.0.0.0"


def test_the_readmes_retrain_config_is_a_valid_config(tmp_path):
    """The example file of the README's retrain section, as a user would copy it."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("one section per stage")[1].split("```yaml\n")[1].split("```")[0]
    (tmp_path / "retrain.yaml").write_text(example)
    config = _config("--config", str(tmp_path / "retrain.yaml"))
    assert config.serve.app.max_rows_per_forward == 16 and config.train.scaling.cpus_per_worker == 2


def test_train_and_retrain_share_option_names_and_defaults():
    from flows.cli.train import train_settings_from_args

    train = train_settings_from_args(build_parser().parse_args(["train", "/data"]))
    retrain = _config().train
    assert train.scaling == retrain.scaling  # the same CPUs, threads and GPU default
    fields = ("experiment", "model_name", "checkpoint_every", "mlflow_checkpoints", "max_failures")
    fields += ("verbose",)
    assert {f: getattr(train, f) for f in fields} == {f: getattr(retrain, f) for f in fields}
    argv = ["--gpu", "--experiment", "nightly", "--checkpoint-every", "50", "--max-failures", "3"]
    argv += ["--mlflow-checkpoints", "final", "--workers", "2", "--verbose"]
    train = train_settings_from_args(build_parser().parse_args(["train", "/data", *argv]))
    retrain = _config(*argv).train
    assert train.scaling == retrain.scaling and train.scaling.use_gpu
    assert {f: getattr(train, f) for f in fields} == {f: getattr(retrain, f) for f in fields}
    assert retrain.experiment == "nightly" and retrain.mlflow_checkpoints == "final"
    assert retrain.verbose and not _config().train.verbose


def test_set_reaches_any_field_and_says_what_is_wrong(tmp_path):
    path = tmp_path / "retrain.yaml"
    path.write_text("serve: {port: 9000}\n")  # a section without its app settings
    config = _config(
        "--config",
        str(path),
        "--set",
        "evaluation.samples_per_class=20",
        "--set",
        "serve.app.max_rows_per_forward=64",
        "--set",
        "train.tracking.outage_budget_s=60",
        "--set",
        "shard.workers=null",
        "--set",
        "source=digits folder",
    )
    assert config.evaluation.samples_per_class == 20
    assert config.serve.port == 9000 and config.serve.app.max_rows_per_forward == 64
    # the sections it creates start from the defaults, not from empty
    assert config.serve.app.model_copy(update={"max_rows_per_forward": 0}) == (
        DEFAULTS.serve.app.model_copy(update={"max_rows_per_forward": 0})
    )
    assert config.train.tracking.outage_budget_s == 60 and config.source == "digits folder"
    with pytest.raises(ValidationError, match="evaluation.samples_per_clas"):
        _config("--set", "evaluation.samples_per_clas=20")
    with pytest.raises(ValueError, match="write PATH=VALUE"):
        _config("--set", "evaluation.steps")
    with pytest.raises(ValueError, match="source is a value, not a section"):
        _config("--set", "source.name=x")
