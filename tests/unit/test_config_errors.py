"""Config errors a user can fix: one line per problem naming the field, no traceback,
exit status 2; and no config anywhere accepts inf or NaN."""

from __future__ import annotations

import math

import pytest
from pydantic import BaseModel, ValidationError

from data.manifest import ShardOptions
from flows.cli import main
from flows.retrain_config import RetrainConfig, ShardSettings
from serving.config import AppConfig
from training.config import DiffusionConfig, StageConfig
from training.evaluation.scoring import EvaluationSettings
from training.job import ScalingSettings, TrackingSettings, TrainSettings
from training.models import AutoencoderConfig, UNetConfig
from training.presets import get_preset


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("preset: tiny\nshard: {channels: 1\n", "is not valid YAML at line 3, column 1"),
        ("preset: [tiny\n", "is not valid YAML at line 2, column 1"),
        ("train: {preset: huge}\n", "train.preset: Input should be 'tiny', 'demo' or 'base'"),
        ("train: {scaling: {num_workers: many}}\n", "train.scaling.num_workers: Input should be"),
        ("preset: tiny\n", "preset: unknown field"),  # the layout before train: was nested
        ("shard: {chanels: 1}\n", "shard.chanels: unknown field"),
        ("modelname: x\n", "modelname: unknown field"),
        ("min_improvement: .inf\n", "min_improvement: Input should be a finite number"),
        ("- a list\n", "must hold a mapping of fields, got list"),
    ],
)
def test_ldm_retrain_names_what_is_wrong_in_its_config_file(tmp_path, capsys, text, message):
    path = tmp_path / "retrain.yaml"
    path.write_text(text)
    code, err = _run(capsys, "retrain", "--config", str(path))
    assert code == 2
    assert message in err and err.startswith("ldm retrain: error: ")


def test_a_json_syntax_error_says_where(tmp_path, capsys):
    path = tmp_path / "retrain.json"
    path.write_text('{"preset": "tiny",\n "workers": }')
    code, err = _run(capsys, "retrain", "--config", str(path))
    assert (code, err.count("\n")) == (2, 1)
    assert "is not valid JSON at line 2, column 13" in err


def test_ldm_train_reads_a_yaml_model_config_and_names_a_bad_field(tmp_path, capsys):
    path = tmp_path / "model.yaml"
    path.write_text("preset: custom\nseed: 1\n")
    code, err = _run(capsys, "train", str(tmp_path), "--config", str(path))
    assert code == 2 and "autoencoder: Field required" in err


def test_ldm_train_and_serve_refuse_bad_options_with_status_2(tmp_path, capsys):
    code, err = _run(capsys, "train", str(tmp_path), "--storage", "relative/runs")
    assert code == 2 and "storage_url: storage must be an absolute path" in err
    code, err = _run(capsys, "serve", "--request-timeout-s", "inf")
    assert code == 2 and "--request-timeout-s: Input should be a finite number" in err


def test_a_retrain_without_a_val_split_is_refused_before_any_work(capsys):
    code, err = _run(capsys, "retrain", "--val-fraction", "0")
    assert code == 2 and "need a val split: use --val-fraction 0.1" in err
    with pytest.raises(ValidationError, match="evaluation and promotion need a val split"):
        RetrainConfig(shard=ShardSettings(val_fraction=0.0))


FLOAT_FIELDS: list[tuple[type[BaseModel], dict, str]] = [
    (DiffusionConfig, {}, "input_perturbation"),
    (StageConfig, {"steps": 1, "batch_size": 1, "learning_rate": 1e-3}, "learning_rate"),
    (StageConfig, {"steps": 1, "batch_size": 1, "learning_rate": 1e-3}, "grad_clip"),
    (AutoencoderConfig, {}, "scale_factor"),
    (AutoencoderConfig, {}, "kl_weight"),
    (UNetConfig, {}, "dropout"),
    (ScalingSettings, {}, "cpus_per_worker"),
    (TrackingSettings, {}, "outage_budget_s"),
    (ShardOptions, {}, "val_fraction"),
    (AppConfig, {}, "max_guidance_scale"),
    (AppConfig, {}, "request_timeout_s"),
    (RetrainConfig, {}, "min_improvement"),
    (EvaluationSettings, {}, "guidance_scale"),
]


@pytest.mark.parametrize(("model", "base", "field"), FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_no_config_accepts_inf_or_nan(model, base, field, value):
    with pytest.raises(ValidationError, match="finite number"):
        model.model_validate(base | {field: value})


def test_a_whole_model_config_with_inf_inside_is_refused():
    data = get_preset("tiny").model_dump()
    data["denoiser_training"]["learning_rate"] = float("inf")
    with pytest.raises(ValidationError, match="denoiser_training.learning_rate"):
        type(get_preset("tiny")).model_validate(data)


def test_a_model_config_gives_only_what_differs_from_its_preset():
    tiny = get_preset("tiny")
    settings = TrainSettings.model_validate(
        {"preset": "tiny", "model": {"denoiser": {"num_res_blocks": 2}, "seed": 7}}
    )
    denoiser = tiny.denoiser.model_copy(update={"num_res_blocks": 2})
    assert settings.model == tiny.model_copy(update={"denoiser": denoiser, "seed": 7})
    # its own preset field names the preset it changes
    own = TrainSettings.model_validate({"preset": "tiny", "model": {"preset": "demo"}})
    assert own.model == get_preset("demo")
    # a complete config is taken as it is; one that names no preset must be complete
    assert TrainSettings.model_validate({"model": tiny.model_dump()}).model == tiny
    with pytest.raises(ValidationError, match="autoencoder\n  Field required"):
        TrainSettings.model_validate({"model": {"preset": "custom", "seed": 1}})


def test_one_bad_model_field_is_one_error_line(tmp_path, capsys):
    code, err = _run(capsys, "retrain", "--set", "train.model.denoiser.num_res_blocks=0")
    assert (code, err.count("\n")) == (2, 1)
    assert "train.model.denoiser.num_res_blocks: Input should be greater than or equal" in err
    path = tmp_path / "model.yaml"
    path.write_text("denoiser_training: {steps: -1}\n")
    code, err = _run(capsys, "train", str(tmp_path), "--config", str(path))
    assert (code, err.count("\n")) == (2, 1)
    assert err.startswith("ldm train: error: denoiser_training.steps: Input should be")
