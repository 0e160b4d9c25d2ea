"""The stage table: what the pipeline trains, in order, and what each stage needs.

autoencoder (on pixels; its end measures the latent scale) → the latent cache →
denoiser (on latents, keeps an EMA) → classifier (on latents). The in-process
trainer (``training.local``) and the Ray driver (``training.ray.driver``) both
iterate :data:`STAGES`, and the Ray worker loop looks its stage up here, so the
order and the per-stage choices are written once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from training.config import LDMConfig, StageConfig
from training.diffusion import GaussianDiffusion
from training.losses import autoencoder_losses, classifier_losses, denoiser_losses, latent_std
from training.models import Autoencoder, NoisyLatentClassifier, UNet
from training.names import StageName

Inputs = Literal["pixels", "latents"]
Losses = Callable[[nn.Module, Tensor, Tensor, GaussianDiffusion, LDMConfig], dict[str, Tensor]]
# After the stage: the config with what the trained network measured (on pixel batches).
Finish = Callable[[LDMConfig, nn.Module, Iterable[Tensor]], LDMConfig]

SCALE_ESTIMATE_BATCHES = 20  # pixel batches the latent scale is measured on, at most


@dataclass(frozen=True)
class Stage:
    """One row of the table."""

    name: StageName
    inputs: Inputs  # what its batches hold: pixels, or the cached scaled latents
    build: Callable[[LDMConfig], nn.Module]
    losses: Losses
    keeps_ema: bool = False  # the EMA weights are the ones that sample
    finish: Finish | None = None

    def training(self, config: LDMConfig) -> StageConfig:
        """How this stage optimises (steps, batch size, learning rate, …)."""
        return getattr(config, f"{self.name}_training")

    def network(self, model: object) -> nn.Module:
        """This stage's network in a bundle that holds all three (``LatentDiffusion``)."""
        return getattr(model, self.name)


def with_latent_scale(
    config: LDMConfig, autoencoder: nn.Module, pixel_batches: Iterable[Tensor]
) -> LDMConfig:
    """``config`` with scale_factor = 1/std of the posterior means over (at most
    :data:`SCALE_ESTIMATE_BATCHES` of) ``pixel_batches``, so the latents the denoiser
    sees have unit variance."""
    was_training = autoencoder.training
    autoencoder.eval()
    batches = itertools.islice(pixel_batches, SCALE_ESTIMATE_BATCHES)
    scale = 1.0 / latent_std(autoencoder, batches)
    autoencoder.train(was_training)
    updated = config.autoencoder.model_copy(update={"scale_factor": scale})
    return config.model_copy(update={"autoencoder": updated})


def _autoencoder_losses(net, x, y, diffusion, config):
    return autoencoder_losses(net, x, config.autoencoder.kl_weight)


def _denoiser_losses(net, z0, y, diffusion, config):
    return denoiser_losses(net, diffusion, z0, y, config.diffusion, config.num_classes)


def _classifier_losses(net, z0, y, diffusion, config):
    return classifier_losses(net, diffusion, z0, y)


STAGES: tuple[Stage, ...] = (
    Stage(
        "autoencoder",
        inputs="pixels",
        build=lambda config: Autoencoder(config.autoencoder),
        losses=_autoencoder_losses,
        finish=with_latent_scale,
    ),
    Stage(
        "denoiser",
        inputs="latents",
        build=lambda config: UNet(config.denoiser),
        losses=_denoiser_losses,
        keeps_ema=True,
    ),
    Stage(
        "classifier",
        inputs="latents",
        build=lambda config: NoisyLatentClassifier(config.classifier),
        losses=_classifier_losses,
    ),
)
STAGE_NAMES: tuple[StageName, ...] = tuple(stage.name for stage in STAGES)


def get_stage(name: str) -> Stage:
    """The table's row for ``name``; anything else is an error, never a default."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ValueError(f"unknown stage {name!r}: expected one of {', '.join(STAGE_NAMES)}")
