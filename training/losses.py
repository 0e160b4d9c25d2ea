"""The loss of one optimisation step of each stage, and the latent scale measured
after the autoencoder's. Written once for the in-process trainer and the Ray Train
worker loop; every function takes its settings as arguments and reads no global state.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import DiffusionConfig
from training.diffusion import GaussianDiffusion, drop_labels
from training.models import Autoencoder, autoencoder_loss


def autoencoder_losses(model: nn.Module, x: Tensor, kl_weight: float) -> dict[str, Tensor]:
    """Stage 1. x: pixels [B, C, H, W] in [-1, 1]."""
    recon, mean, logvar = model(x)
    return autoencoder_loss(x, recon, mean, logvar, kl_weight)


def denoiser_losses(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    z0: Tensor,
    y: Tensor,
    cfg: DiffusionConfig,
    num_classes: int,
) -> dict[str, Tensor]:
    """Stage 2: DDPM-IP on scaled latents z0 [B, c, h, w]; labels y long [B] are
    dropped to the null class ``num_classes`` with probability ``cfg.p_uncond``."""
    t = torch.randint(0, diffusion.num_timesteps, (z0.shape[0],), device=z0.device)
    y = drop_labels(y, num_classes, cfg.p_uncond)
    losses = diffusion.training_losses(
        model,
        z0,
        t,
        y,
        input_perturbation=cfg.input_perturbation,
        min_snr_gamma=cfg.min_snr_gamma,
    )
    return {"loss": losses["loss"].mean()}


def classifier_losses(
    model: nn.Module, diffusion: GaussianDiffusion, z0: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """Stage 3: cross-entropy of p_φ(y | z_t, t) on latents noised to a uniform t."""
    t = torch.randint(0, diffusion.num_timesteps, (z0.shape[0],), device=z0.device)
    logits = model(diffusion.q_sample(z0, t), t)
    loss = F.cross_entropy(logits, y)
    accuracy = (logits.argmax(dim=1) == y).float().mean()
    return {"loss": loss, "accuracy": accuracy}


@torch.no_grad()
def latent_std(autoencoder: Autoencoder, batches: Iterable[Tensor]) -> float:
    """Standard deviation of the unscaled posterior means over ``batches`` of pixels."""
    count, total, total_sq = 0, 0.0, 0.0
    for x in batches:
        mean = autoencoder.encode(x)[0].double()
        count += mean.numel()
        total += float(mean.sum())
        total_sq += float(mean.pow(2).sum())
    if count == 0:
        raise ValueError("cannot compute the latent scale from an empty dataset")
    variance = total_sq / count - (total / count) ** 2
    return max(variance, 1e-12) ** 0.5
