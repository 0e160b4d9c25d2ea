"""One optimisation step of each stage, independent of how the loop is distributed.

The in-process trainer and the Ray Train loop both call these, so the math of a
step is written once. Every function takes its settings as arguments and reads
no global state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import DiffusionConfig, StageConfig
from training.diffusion import GaussianDiffusion, drop_labels
from training.models import Autoencoder, autoencoder_loss


class NonFiniteLoss(RuntimeError):
    """A stage's loss became inf or NaN: the stage stops, nothing is registered."""

    def __init__(self, stage: str, step: int):
        super().__init__(
            f"the {stage} stage's loss is not finite (inf or NaN) at step {step}; training "
            f"stopped and nothing was registered: lower {stage}_training.learning_rate, "
            "check the data for damaged samples, or resume from an earlier checkpoint"
        )
        self.stage, self.step = stage, step


class FiniteLossGuard:
    """Remembers the first step whose loss was not finite. :meth:`observe` stays on
    the device (a GPU loop does not wait for it); :meth:`first_bad_step` reads it."""

    NONE = 2**62

    def __init__(self, device: torch.device):
        self._first = torch.full((), self.NONE, dtype=torch.int64, device=device)

    def observe(self, loss: Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()) & (self._first == self.NONE)
        self._first = torch.where(bad, step, self._first)

    def first_bad_step(self, distributed: bool = False) -> int | None:
        """The first non-finite step so far (over all ranks when ``distributed``: every
        rank must call this at the same steps); None when every loss was finite."""
        first = self._first.clone()
        if distributed:
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        value = int(first)
        return None if value == self.NONE else value


@dataclass
class Optimisation:
    """AdamW, a linear warm-up to the stage's learning rate, and gradient clipping."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_clip: float

    def step(self, loss: Tensor, model: nn.Module) -> Tensor:
        """Backpropagate ``loss``, clip, update; returns the pre-clip gradient norm as a
        0-d tensor, so that a GPU loop only waits for it on the steps that log it."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return grad_norm.detach()

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def make_optimisation(model: nn.Module, stage: StageConfig) -> Optimisation:
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=stage.learning_rate, weight_decay=stage.weight_decay
    )
    warmup = max(stage.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup)
    )
    return Optimisation(optimizer, scheduler, stage.grad_clip)


def autoencoder_losses(
    model: nn.Module, x: Tensor, kl_weight: float, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Stage 1. x: pixels [B, C, H, W] in [-1, 1]."""
    recon, mean, logvar = model(x, generator=generator)
    return autoencoder_loss(x, recon, mean, logvar, kl_weight)


def denoiser_losses(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    z0: Tensor,
    y: Tensor,
    cfg: DiffusionConfig,
    num_classes: int,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Stage 2: DDPM-IP on scaled latents z0 [B, c, h, w]; labels y long [B] are
    dropped to the null class ``num_classes`` with probability ``cfg.p_uncond``."""
    t = torch.randint(0, diffusion.num_timesteps, (z0.shape[0],), device=z0.device)
    y = drop_labels(y, num_classes, cfg.p_uncond)
    losses = diffusion.training_losses(model, z0, t, y, input_perturbation=cfg.input_perturbation)
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
