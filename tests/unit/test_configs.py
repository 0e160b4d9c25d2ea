"""Configs: frozen, strict, JSON round-trip, cross-field checks, presets."""

import pydantic
import pytest

from training.config import LDMConfig
from training.models import AutoencoderConfig
from training.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    config = get_preset(name)
    assert config.preset == name
    again = LDMConfig.model_validate_json(config.model_dump_json())
    assert again == config


def test_configs_are_frozen_and_reject_unknown_keys():
    config = get_preset("tiny")
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.seed = 3
    data = config.model_dump()
    data["denoiser"]["width"] = 64
    with pytest.raises(pydantic.ValidationError, match="width"):
        LDMConfig.model_validate(data)


def test_inconsistent_configs_say_what_to_fix():
    data = get_preset("tiny").model_dump()
    data["denoiser"]["in_channels"] = 3
    with pytest.raises(pydantic.ValidationError, match=r"denoiser.in_channels \(3\) must equal"):
        LDMConfig.model_validate(data)
    data = get_preset("tiny").model_dump()
    data["image_size"] = 30
    with pytest.raises(pydantic.ValidationError, match="not divisible by 4"):
        LDMConfig.model_validate(data)
    with pytest.raises(pydantic.ValidationError, match="input_perturbation"):
        LDMConfig.model_validate(
            get_preset("tiny").model_dump() | {"diffusion": {"input_perturbation": -1}}
        )


def test_for_data_adapts_channels_and_classes():
    config = get_preset("demo").for_data(64, 3, 4, class_names=("a", "b", "c", "d"))
    assert config.class_names == ("a", "b", "c", "d")
    assert (config.image_size, config.image_channels, config.num_classes) == (64, 3, 4)
    assert config.autoencoder.image_channels == 3
    assert config.denoiser.num_classes == config.classifier.num_classes == 4
    assert config.latent_shape == (4, 16, 16)


def test_class_names_must_match_the_class_count():
    with pytest.raises(pydantic.ValidationError, match="class_names has 2 entries"):
        get_preset("tiny").for_data(32, 1, 3, class_names=("a", "b"))


def test_autoencoder_downsample_factor():
    assert AutoencoderConfig(channel_mult=(1, 2, 2)).downsample_factor == 4
    with pytest.raises(pydantic.ValidationError, match="channel_mult"):
        AutoencoderConfig(channel_mult=())
