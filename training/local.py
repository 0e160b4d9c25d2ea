"""Train every stage in this process on an in-memory image array.

The quick path for a laptop and for ``ldm demo``: no Ray, no storage, no tracking.
It walks the same stage table (``training.stages``) and runs the same per-step code
as the distributed loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from data.reader import to_pixels
from training.config import LDMConfig
from training.diffusion import GaussianDiffusion
from training.latent_diffusion import LatentDiffusion
from training.models import EMA
from training.optimisation import (
    FiniteLossGuard,
    NonFiniteLoss,
    compiled,
    make_optimisation,
    memory_format,
    to_device,
)
from training.progress import StageProgress
from training.stages import STAGES, Stage, get_stage
from training.step import StageStep

Log = Callable[[str], None]
ENCODE_CHUNK = 256  # images per forward pass when encoding or measuring latents


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless index batches of a fresh permutation per epoch (last partial batch dropped)."""
    if n < batch_size:
        raise ValueError(f"dataset has {n} images, fewer than batch_size {batch_size}")
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _run_stage(
    stage: Stage,
    model: LatentDiffusion,
    inputs: Tensor,
    y: Tensor,
    diffusion: GaussianDiffusion,
    generator: torch.Generator,
    progress: bool,
    history: list[tuple[int, float]] | None = None,
) -> dict[str, float]:
    """Run the stage's optimisation steps on ``inputs`` [N, …] (pixels or latents) and
    labels ``y`` [N]; the sampling weights (EMA ones where the stage keeps an EMA) end
    up in ``model``. Returns the last step's metrics; ``history`` gets (step, loss) at
    every logging interval."""
    net, training, config = stage.network(model), stage.training(model.config), model.config
    net.to(memory_format=memory_format(training)).train()
    ema = EMA(net, training.ema_decay) if stage.keeps_ema else None
    optimisation = make_optimisation(net, training)
    train_step = StageStep(
        lambda module, x, labels: stage.losses(module, x, labels, diffusion, config),
        compiled(net, training),
        optimisation,
        ema,
        training,
        torch.device("cpu"),
    )
    batches = _batches(len(y), training.batch_size, generator)
    metrics: dict[str, float] = {}
    guard = FiniteLossGuard(torch.device("cpu"))
    lines = StageProgress(stage.name, training.steps, training.batch_size) if progress else None
    for step in range(training.steps):
        idx = next(batches)
        losses, grad_norm = train_step(to_device(inputs[idx], "cpu", training), y[idx])
        guard.observe(losses["loss"], step + 1)
        if guard.first_bad_step() is not None:  # on the CPU this costs nothing
            raise NonFiniteLoss(stage.name, step + 1)
        metrics = {k: float(v.detach()) for k, v in losses.items()}
        metrics["grad_norm"] = float(grad_norm)
        done = step + 1
        if done % training.log_every == 0 or done == training.steps:
            if lines is not None:
                lines.update(done, metrics["loss"])
            if history is not None:
                history.append((done, metrics["loss"]))
    net.eval()
    if ema is not None:
        setattr(model, stage.name, ema.model)
    return metrics


def train_stage(
    name: str,
    model: LatentDiffusion,
    inputs: Tensor,
    labels: Tensor,
    seed: int,
    progress: bool = False,
) -> LatentDiffusion:
    """One stage of the table on ``inputs`` (pixels [N, C, H, W] in [-1, 1], or scaled
    latents for the latent stages) and ``labels`` long [N], batches drawn with ``seed``;
    returns the model with that network trained (its EMA weights where it keeps one)
    and, after the autoencoder, the measured latent scale. For experiments that train
    one stage many ways on the same inputs (``benchmarks/bench_ip.py``)."""
    stage = get_stage(name)
    diffusion = model.config.diffusion.build()
    generator = torch.Generator().manual_seed(seed)
    _run_stage(stage, model, inputs, labels, diffusion, generator, progress)
    if stage.finish is not None:
        net = stage.network(model)
        model = model.with_config(stage.finish(model.config, net, inputs.split(ENCODE_CHUNK)))
    return model.eval()


def train_in_process(
    config: LDMConfig,
    images: np.ndarray,
    labels: np.ndarray,
    progress: bool = True,
    log: Log = print,
    history: dict[str, list[tuple[int, float]]] | None = None,
) -> LatentDiffusion:
    """Train the stages of :data:`training.stages.STAGES` in order: autoencoder →
    (latents cached once) → denoiser with EMA → classifier.

    images: uint8 [N, H, W] or [N, H, W, C] matching the config's size and channels;
    labels: int [N] in 0 … num_classes−1. Returns the model with EMA denoiser weights;
    ``history`` gets each stage's (step, loss) at its logging intervals.
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
    inputs = {"pixels": pixels}
    for stage in STAGES:
        if stage.inputs not in inputs:  # the latents: encoded once, after the autoencoder
            with torch.no_grad():
                chunks = pixels.split(ENCODE_CHUNK)
                inputs["latents"] = torch.cat([model.autoencoder.encode_latents(c) for c in chunks])
        curve = history.setdefault(stage.name, []) if history is not None else None
        metrics = _run_stage(
            stage, model, inputs[stage.inputs], y, diffusion, generator, progress, curve
        )
        line = f"{stage.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        if stage.finish is not None:
            net = stage.network(model)
            model = model.with_config(stage.finish(model.config, net, pixels.split(ENCODE_CHUNK)))
            line += f", latent scale factor {model.config.autoencoder.scale_factor:.4f}"
        log(line)
    log(f"trained in {time.perf_counter() - started:.0f} s")
    return model.eval()
