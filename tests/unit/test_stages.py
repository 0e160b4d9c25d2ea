"""The stage table: one order, one row per stage, no default for an unknown name."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from training.job import StageJob, TrainJobConfig, WorkerGroupJob
from training.latent_diffusion import LatentDiffusion
from training.presets import get_preset
from training.stages import (
    STAGE_NAMES,
    STAGES,
    StageName,
    get_stage,
    with_latent_scale,
)


def test_the_table_is_the_pipeline_order_and_the_stage_name_type():
    assert STAGE_NAMES == get_args(StageName) == ("autoencoder", "denoiser", "classifier")
    assert [s.inputs for s in STAGES] == ["pixels", "latents", "latents"]
    assert [s.name for s in STAGES if s.keeps_ema] == ["denoiser"]
    assert [s.name for s in STAGES if s.finish is not None] == ["autoencoder"]


def test_an_unknown_stage_is_an_error_not_the_last_stage():
    with pytest.raises(ValueError, match="unknown stage 'clasifier'.*autoencoder, denoiser"):
        get_stage("clasifier")


def test_each_row_builds_the_network_of_the_bundle_and_reads_its_own_settings():
    config = get_preset("tiny")
    model = LatentDiffusion.build(config)
    for stage in STAGES:
        assert type(stage.build(config)) is type(stage.network(model))
        assert stage.training(config) is getattr(config, f"{stage.name}_training")


def test_the_latent_scale_gives_unit_variance_latents_and_updates_every_reader():
    config = get_preset("tiny")
    model = LatentDiffusion.build(config)
    pixels = torch.rand(64, 1, 32, 32) * 2 - 1
    measured = with_latent_scale(config, model.autoencoder, pixels.split(16))
    model = model.with_config(measured)
    assert model.autoencoder.training  # left as it was found
    with torch.no_grad():
        latents = model.autoencoder.encode_latents(pixels)
    assert latents.std().item() == pytest.approx(1.0, rel=1e-3)
    assert model.config.autoencoder.scale_factor == measured.autoencoder.scale_factor != 1.0


def test_a_worker_group_trains_each_stage_once(tmp_path):
    job = TrainJobConfig(
        data_url=str(tmp_path),
        model=get_preset("tiny"),
        storage_url=str(tmp_path),
        run_name="r",
        tracking_uri="sqlite:///x.db",
    )
    stage = StageJob(stage="denoiser", job=job, data_url=str(tmp_path), run_id="1")
    with pytest.raises(ValueError, match="each stage once"):
        WorkerGroupJob(stages=(stage, stage))
    with pytest.raises(ValueError):
        WorkerGroupJob(stages=())
