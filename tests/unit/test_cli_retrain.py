"""``ldm retrain`` / ``ldm schedule`` options → RetrainConfig, and the deployment that
``ldm schedule`` registers (built, not served)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from flows.cli import build_parser
from flows.cli.retrain import retrain_config_from_args
from flows.events import DATASET_EVENT, dataset_trigger
from flows.retrain import DEFAULTS
from flows.schedule import retrain_deployment


def _config(*argv: str):
    return retrain_config_from_args(build_parser().parse_args(["retrain", *argv]))


def test_no_options_give_the_embedded_defaults():
    assert _config() == DEFAULTS


def test_options_override_the_config_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "retrain.yaml"
    path.write_text(
        "preset: tiny\nmodel_name: digits\nshard: {channels: 1, shard_max_samples: 600}\n"
        "evaluation: {samples_per_class: 10, steps: 10}\n"
    )
    config = _config("--config", str(path), "--model-name", "other", "--image-size", "16")
    assert config.preset == "tiny" and config.model_name == "other"
    assert config.shard.image_size == 16 and config.shard.shard_max_samples == 600
    assert config.evaluation.samples_per_class == 10
    assert config.ray_address is None and config.serve


def test_a_bad_config_file_is_refused_with_the_field(tmp_path):
    path = tmp_path / "retrain.json"
    path.write_text(json.dumps({"preset": "huge"}))
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
    assert deployment.parameters["config"]["preset"] == "tiny"
    assert deployment.parameters["config"]["serve"] is False


def test_trigger_for_one_dataset_matches_only_its_resource():
    trigger = dataset_trigger("s3://bucket/digits/")
    assert trigger.match.model_dump() == {"prefect.resource.id": "ldm.dataset.s3://bucket/digits"}


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
    assert _config().serve_host == "127.0.0.1"
    assert _config("--serve-host", "0.0.0.0").serve_host == "0.0.0.0"
