"""Train all three stages in this process on an in-memory image array.

The quick path for a laptop and for ``ldm demo``: no Ray, no storage, no tracking.
It runs the same per-step code as the distributed loop (``training.stages``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from data.reader import to_pixels
from training.config import LDMConfig, StageConfig
from training.models import EMA
from training.pipeline import LatentDiffusion
from training.stages import (
    FiniteLossGuard,
    NonFiniteLoss,
    autoencoder_losses,
    classifier_losses,
    denoiser_losses,
    latent_std,
    make_optimisation,
)

Log = Callable[[str], None]


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless index batches of a fresh permutation per epoch (last partial batch dropped)."""
    if n < batch_size:
        raise ValueError(f"dataset has {n} images, fewer than batch_size {batch_size}")
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _run_stage(
    name: str,
    stage: StageConfig,
    model: torch.nn.Module,
    step_losses: Callable[[Tensor], dict[str, Tensor]],
    n: int,
    generator: torch.Generator,
    progress: bool,
    ema: EMA | None = None,
) -> dict[str, float]:
    """Run ``stage.steps`` optimisation steps; returns the last step's metrics."""
    model.train()
    optimisation = make_optimisation(model, stage)
    batches = _batches(n, stage.batch_size, generator)
    metrics: dict[str, float] = {}
    guard = FiniteLossGuard(torch.device("cpu"))
    bar = tqdm(range(stage.steps), desc=name, disable=not progress, mininterval=1.0)
    for step in bar:
        losses = step_losses(next(batches))
        guard.observe(losses["loss"], step + 1)
        if guard.first_bad_step() is not None:  # on the CPU this costs nothing
            raise NonFiniteLoss(name, step + 1)
        grad_norm = optimisation.step(losses["loss"], model)
        if ema is not None:
            ema.update(model)
        metrics = {k: float(v.detach()) for k, v in losses.items()}
        metrics["grad_norm"] = float(grad_norm)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
    model.eval()
    return metrics


def train_in_process(
    config: LDMConfig,
    images: np.ndarray,
    labels: np.ndarray,
    progress: bool = True,
    log: Log = print,
) -> LatentDiffusion:
    """Train autoencoder → (latents cached once) → denoiser with EMA → classifier.

    images: uint8 [N, H, W] or [N, H, W, C] matching the config's size and channels;
    labels: int [N] in 0 … num_classes−1. Returns the model with EMA denoiser weights.
    """
    pixels, y = to_pixels(images), torch.as_tensor(labels, dtype=torch.long)
    expected = (config.image_channels, config.image_size, config.image_size)
    if tuple(pixels.shape[1:]) != expected:
        raise ValueError(f"images are {tuple(pixels.shape[1:])}, the config expects {expected}")
    if len(y) != len(pixels) or (y < 0).any() or (y >= config.num_classes).any():
        raise ValueError(f"need one label in 0 … {config.num_classes - 1} per image")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = LatentDiffusion.build(config)
    diffusion = config.diffusion.build()

    started = time.perf_counter()
    ae, kl_weight = model.autoencoder, config.autoencoder.kl_weight
    m = _run_stage(
        "autoencoder",
        config.autoencoder_training,
        ae,
        lambda idx: autoencoder_losses(ae, pixels[idx], kl_weight),
        len(y),
        generator,
        progress,
    )
    scale = 1.0 / latent_std(ae, pixels.split(256))
    config = config.model_copy(
        update={"autoencoder": config.autoencoder.model_copy(update={"scale_factor": scale})}
    )
    model.config, ae.config = config, config.autoencoder
    log(f"autoencoder: L1 {m['reconstruction']:.4f}, latent scale factor {scale:.4f}")

    with torch.no_grad():
        latents = torch.cat([ae.encode_latents(chunk) for chunk in pixels.split(256)])

    denoiser, null_id = model.denoiser, config.num_classes
    ema = EMA(denoiser, config.denoiser_training.ema_decay)
    m = _run_stage(
        "denoiser",
        config.denoiser_training,
        denoiser,
        lambda idx: denoiser_losses(
            denoiser, diffusion, latents[idx], y[idx], config.diffusion, null_id
        ),
        len(y),
        generator,
        progress,
        ema,
    )
    model.denoiser = ema.model
    log(f"denoiser: loss {m['loss']:.4f}")

    classifier = model.classifier
    m = _run_stage(
        "classifier",
        config.classifier_training,
        classifier,
        lambda idx: classifier_losses(classifier, diffusion, latents[idx], y[idx]),
        len(y),
        generator,
        progress,
    )
    log(f"classifier: loss {m['loss']:.4f}, accuracy {m['accuracy']:.3f}")
    log(f"trained in {time.perf_counter() - started:.0f} s")
    return model.eval()
