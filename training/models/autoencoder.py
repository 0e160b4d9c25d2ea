"""KL-regularised convolutional autoencoder (Rombach et al. 2022, §3.1)."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models.configs import AutoencoderConfig
from training.models.layers import Downsample, ResBlock, Upsample, group_norm

ENCODE_BATCH = 256  # images per encode_batch call of the latent cache


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.image_channels, chans[0], 3, padding=1)
        blocks: list[nn.Module] = []
        ch = chans[0]
        for level, out_ch in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, out_ch))
                ch = out_ch
            if level < len(chans) - 1:
                blocks.append(Downsample(ch))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.conv_in(x))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in reversed(cfg.channel_mult)]
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        blocks: list[nn.Module] = []
        ch = chans[0]
        for level, out_ch in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, out_ch))
                ch = out_ch
            if level < len(chans) - 1:
                blocks.append(Upsample(ch))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.image_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z)))))


class Autoencoder(nn.Module):
    """Pixels x [B, C, H, W] in [-1, 1] ↔ unscaled latents [B, latent_channels, H/f, W/f].

    The diffusion model works on scaled latents z0 = ``config.scale_factor`` · E(x);
    :meth:`encode_latents` and :meth:`decode_latents` apply and undo that scale.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z | x), each [B, latent_channels, H/f, W/f]."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """Reconstruct pixels (unbounded; clamp to [-1, 1] for display) from unscaled z."""
        return self.decoder(z)

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction from a reparameterised latent sample, plus the posterior."""
        mean, logvar = self.encode(x)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        z = mean + torch.exp(0.5 * logvar) * noise
        return self.decode(z), mean, logvar

    def encode_latents(self, x: Tensor) -> Tensor:
        """Scaled posterior means z0 = scale_factor · mean(x), the diffusion's data."""
        return self.encode(x)[0] * self.config.scale_factor

    def decode_latents(self, z0: Tensor) -> Tensor:
        """Pixels in [-1, 1] from scaled latents z0."""
        return self.decode(z0 / self.config.scale_factor).clamp(-1.0, 1.0)


def autoencoder_loss(
    x: Tensor, recon: Tensor, mean: Tensor, logvar: Tensor, kl_weight: float
) -> dict[str, Tensor]:
    """L1 reconstruction + kl_weight · KL(q(z|x) ‖ N(0, I)), both averaged per element.

    Returns scalars ``loss``, ``reconstruction`` and ``kl``.
    """
    reconstruction = (recon - x).abs().mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return {"loss": reconstruction + kl_weight * kl, "reconstruction": reconstruction, "kl": kl}


def encode_batch(autoencoder: Autoencoder, pixels: torch.Tensor) -> np.ndarray:
    """Scaled posterior means of ``pixels`` (float32 [B, C, H, W]) as float32 numpy
    [B, c, h, w]: the latent cache's pass, computed where ``autoencoder`` is, on a GPU
    under bf16 autocast (``benchmarks/gpu_check.py``'s ``encode`` runs time this very
    function), on the CPU in float32."""
    device = next(autoencoder.parameters()).device
    cast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    with torch.inference_mode(), cast:
        latents = autoencoder.encode_latents(pixels.to(device, non_blocking=True))
    return latents.float().cpu().numpy()
