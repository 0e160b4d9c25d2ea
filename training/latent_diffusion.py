"""A trained latent diffusion model: autoencoder, denoiser, classifier and their config.

Saved as safetensors weights plus ``config.json``; loading rebuilds each network
from the config and never unpickles code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save, save_file
from torch import Tensor

from training.config import LDMConfig
from training.diffusion import GaussianDiffusion, SamplerName
from training.models import Autoencoder, NoisyLatentClassifier, UNet

CONFIG_FILE = "config.json"
WEIGHT_FILES = {
    "autoencoder": "autoencoder.safetensors",
    "denoiser": "denoiser.safetensors",
    "classifier": "classifier.safetensors",
}


@dataclass
class LatentDiffusion:
    """Everything needed to sample images. ``denoiser`` holds the EMA weights once trained."""

    config: LDMConfig
    autoencoder: Autoencoder
    denoiser: UNet
    classifier: NoisyLatentClassifier

    @classmethod
    def build(cls, config: LDMConfig) -> LatentDiffusion:
        """Freshly initialised networks for ``config``."""
        return cls(
            config,
            Autoencoder(config.autoencoder),
            UNet(config.denoiser),
            NoisyLatentClassifier(config.classifier),
        )

    def with_config(self, config: LDMConfig) -> LatentDiffusion:
        """These networks under ``config`` (after a stage measured, e.g., the latent
        scale): the bundle and each network read their settings from it."""
        self.config = config
        for name in WEIGHT_FILES:
            getattr(self, name).config = getattr(config, name)
        return self

    @property
    def diffusion(self) -> GaussianDiffusion:
        return self.config.diffusion.build()

    def eval(self) -> LatentDiffusion:
        for net in (self.autoencoder, self.denoiser, self.classifier):
            net.eval().requires_grad_(False)
        return self

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor | None,
        num_samples: int | None = None,
        guidance_scale: float | Tensor = 0.0,
        classifier_scale: float | Tensor = 0.0,
        sampler: SamplerName = "ddpm",
        steps: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eps_scaling: float | Tensor = 1.0,
        eps_scaling_slope: float | Tensor = 0.0,
    ) -> Tensor:
        """Pixels [B, C, H, W] in [-1, 1]. ``labels`` long [B] (or None with
        ``num_samples`` for unconditional samples); the other arguments are those of
        :meth:`GaussianDiffusion.sample`."""
        if labels is None and num_samples is None:
            raise ValueError("give either labels or num_samples")
        batch = len(labels) if labels is not None else num_samples
        z0 = self.diffusion.sample(
            self.denoiser,
            (batch, *self.config.latent_shape),
            y=labels,
            guidance_scale=guidance_scale,
            sampler=sampler,
            steps=steps,
            eta=eta,
            classifier=self.classifier,
            classifier_scale=classifier_scale,
            generator=generator,
            eps_scaling=eps_scaling,
            eps_scaling_slope=eps_scaling_slope,
        )
        return self.autoencoder.decode_latents(z0)

    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` and one safetensors file per network into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(self.config.model_dump_json(indent=2))
        for name, state in self._states().items():
            save_file(state, str(directory / WEIGHT_FILES[name]))
        return directory

    def to_bytes(self) -> tuple[str, dict[str, bytes]]:
        """The config as JSON and each network's weights as safetensors bytes: what
        :meth:`save` writes, in memory (e.g. for another process)."""
        weights = {name: save(state) for name, state in self._states().items()}
        return self.config.model_dump_json(), weights

    @classmethod
    def from_bytes(
        cls, config_json: str, weights: dict[str, bytes], device: str | torch.device = "cpu"
    ) -> LatentDiffusion:
        """Rebuild from :meth:`to_bytes`, in eval mode on ``device``."""
        states = {name: load(weights[name]) for name in WEIGHT_FILES}
        return cls._rebuild(LDMConfig.model_validate_json(config_json), states, device)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> LatentDiffusion:
        """Rebuild from a folder written by :meth:`save`, in eval mode."""
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not a saved model folder")
        config = LDMConfig.model_validate(json.loads(config_path.read_text()))
        states = {
            name: load_file(str(directory / filename), device=str(device))
            for name, filename in WEIGHT_FILES.items()
        }
        return cls._rebuild(config, states, device)

    def _states(self) -> dict[str, dict[str, Tensor]]:
        """Each network's weights, contiguous (as safetensors stores them)."""
        return {
            name: {k: v.contiguous() for k, v in getattr(self, name).state_dict().items()}
            for name in WEIGHT_FILES
        }

    @classmethod
    def _rebuild(
        cls, config: LDMConfig, states: dict[str, dict[str, Tensor]], device: str | torch.device
    ) -> LatentDiffusion:
        model = cls.build(config)
        for name in WEIGHT_FILES:
            net = getattr(model, name)
            net.load_state_dict(states[name])
            net.to(device)
        return model.eval()
