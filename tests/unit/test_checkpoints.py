"""Stage checkpoints: safetensors and JSON only, and a stage continued from one takes
exactly the step it would have taken without stopping."""

import copy

import pytest
import torch

from training.checkpoints import StageState, load_checkpoint, save_checkpoint
from training.models import EMA
from training.optimisation import make_optimisation
from training.presets import get_preset
from training.stages import get_stage


def _stage(config):
    torch.manual_seed(0)
    stage = get_stage("denoiser")
    net = stage.build(config)
    return net, make_optimisation(net, stage.training(config)), EMA(net, 0.9)


def _train(net, optimisation, ema, config, steps, seed):
    diffusion = config.diffusion.build()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        z0 = torch.randn(4, *config.latent_shape, generator=generator)
        y = torch.randint(0, config.num_classes, (4,), generator=generator)
        torch.manual_seed(seed)
        losses = get_stage("denoiser").losses(net, z0, y, diffusion, config)
        optimisation.step(losses["loss"], net)
        ema.update(net)


def test_a_stage_resumed_from_its_checkpoint_continues_exactly(tmp_path):
    config = get_preset("tiny").for_data(32, 1, 10)
    net, optimisation, ema = _stage(config)
    _train(net, optimisation, ema, config, steps=3, seed=1)
    state = StageState(
        stage="denoiser",
        step=3,
        epoch=1,
        batches_into_epoch=2,
        model=net.state_dict(),
        optimizer=optimisation.optimizer.state_dict(),
        scheduler=optimisation.scheduler.state_dict(),
        ema=ema.state_dict(),
    )
    save_checkpoint(tmp_path, state, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "ema.safetensors",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    expected = (copy.deepcopy(net), copy.deepcopy(ema))
    _train(net, optimisation, ema, config, steps=2, seed=2)  # uninterrupted

    loaded, loaded_config = load_checkpoint(tmp_path)
    assert (loaded.stage, loaded.step, loaded.epoch, loaded.batches_into_epoch) == (
        "denoiser",
        3,
        1,
        2,
    )
    assert loaded_config == config
    resumed, resumed_optimisation, resumed_ema = _stage(config)
    resumed.load_state_dict(loaded.model)
    resumed_optimisation.optimizer.load_state_dict(loaded.optimizer)
    resumed_optimisation.scheduler.load_state_dict(loaded.scheduler)
    resumed_ema.load_state_dict(loaded.ema)
    for a, b in zip(resumed.parameters(), expected[0].parameters(), strict=True):
        assert torch.equal(a, b)
    _train(resumed, resumed_optimisation, resumed_ema, config, steps=2, seed=2)
    for a, b in zip(resumed.parameters(), net.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(resumed_ema.model.parameters(), ema.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed_optimisation.learning_rate == optimisation.learning_rate


def test_an_earlier_state_pt_checkpoint_still_loads_and_a_folder_without_one_is_named(
    tmp_path,
):
    config = get_preset("tiny").for_data(32, 1, 10)
    net, optimisation, _ = _stage(config)
    torch.save(
        {
            "stage": "denoiser",
            "step": 7,
            "epoch": 0,
            "batches_into_epoch": 7,
            "model": net.state_dict(),
            "optimizer": optimisation.optimizer.state_dict(),
            "scheduler": optimisation.scheduler.state_dict(),
            "ema": None,
        },
        tmp_path / "state.pt",
    )
    (tmp_path / "config.json").write_text(config.model_dump_json())
    state, _ = load_checkpoint(tmp_path)
    assert state.step == 7 and state.ema is None
    with pytest.raises(FileNotFoundError, match="not a stage checkpoint folder"):
        load_checkpoint(tmp_path / "nothing")


def test_resume_from_takes_a_logged_checkpoint_or_a_folder_and_explains_the_rest():
    from pydantic import ValidationError

    from training.job import TrainSettings

    run = "0123456789abcdef0123456789abcdef"
    for good in (f"runs:/{run}/checkpoints/denoiser/step-0000400", "s3://b/runs/x-denoiser/c"):
        assert TrainSettings(resume_from=good).resume_from == good
    with pytest.raises(ValidationError, match="registered model: its weights"):
        TrainSettings(resume_from="models:/ldm@champion")
    with pytest.raises(ValidationError, match="runs:/RUN_ID/checkpoints/STAGE/step-NNNNNNN"):
        TrainSettings(resume_from=f"runs:/{run}/model")


def test_a_warm_start_names_a_registered_version_and_excludes_a_resume():
    from pydantic import ValidationError

    from flows.retrain_config import RetrainConfig
    from training.job import TrainSettings

    settings = TrainSettings(init_from=" models:/ldm@champion", reuse_autoencoder=True)
    assert settings.init_from == "models:/ldm@champion"
    assert TrainSettings(init_from="models:/ldm/3").init_from == "models:/ldm/3"
    run = "0123456789abcdef0123456789abcdef"
    with pytest.raises(ValidationError, match="continue it with resume_from"):
        TrainSettings(init_from=f"runs:/{run}/checkpoints/denoiser/step-0000400")
    with pytest.raises(ValidationError, match="models:/NAME@ALIAS"):
        TrainSettings(init_from="ldm@champion")
    with pytest.raises(ValidationError, match="not both"):
        TrainSettings(
            init_from="models:/ldm/3", resume_from=f"runs:/{run}/checkpoints/denoiser/step-0000400"
        )
    with pytest.raises(ValidationError, match="give init_from"):
        TrainSettings(reuse_autoencoder=True)
    with pytest.raises(ValidationError, match="set warm_start.from_champion"):
        RetrainConfig(warm_start={"reuse_autoencoder": True})
    with pytest.raises(ValidationError, match="keep one"):
        RetrainConfig(warm_start={"from_champion": True}, train={"init_from": "models:/ldm/1"})


def test_weights_written_to_storage_load_back_exactly(tmp_path):
    from training.checkpoints import load_weights, save_weights

    net = get_stage("classifier").build(get_preset("tiny"))
    url = str(tmp_path / "run" / "init" / "classifier" / "model.safetensors")
    save_weights(url, net.state_dict())
    loaded = load_weights(url)
    assert loaded.keys() == net.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
