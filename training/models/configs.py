"""Constructor settings of each network. Every saved model carries its config as JSON
and is rebuilt from it, so these classes are the schema of the model artifacts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from data.frozen import FrozenConfig


def _check_mult(mult: tuple[int, ...]) -> tuple[int, ...]:
    if not mult or any(m < 1 for m in mult):
        raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {mult}")
    return mult


class AutoencoderConfig(FrozenConfig):
    """KL autoencoder: pixels [C, H, W] in [-1, 1] ↔ latents [latent_channels, H/f, W/f]
    with f = 2^(len(channel_mult) − 1)."""

    image_channels: Literal[1, 3] = 1
    base_channels: int = Field(32, ge=4)
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = Field(1, ge=1)
    latent_channels: int = Field(4, ge=1)
    kl_weight: float = Field(1e-6, ge=0.0)
    # 1/std of the training latents: z0 = scale_factor · E(x) has unit variance (Rombach et al.).
    scale_factor: float = Field(1.0, gt=0.0)

    _mult = field_validator("channel_mult")(_check_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


class UNetConfig(FrozenConfig):
    """Latent denoiser ε_θ(z_t, t, y); class id ``num_classes`` is the null label."""

    in_channels: int = Field(4, ge=1)
    model_channels: int = Field(64, ge=4)
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = Field(2, ge=1)
    attention: bool = True  # self-attention at the lowest resolution
    num_heads: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    num_classes: int = Field(10, ge=0)

    _mult = field_validator("channel_mult")(_check_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


class ClassifierConfig(FrozenConfig):
    """Noisy-latent classifier p_φ(y | z_t, t) for classifier guidance."""

    in_channels: int = Field(4, ge=1)
    model_channels: int = Field(32, ge=4)
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = Field(1, ge=1)
    num_classes: int = Field(10, ge=1)

    _mult = field_validator("channel_mult")(_check_mult)
