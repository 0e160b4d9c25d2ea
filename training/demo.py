"""The no-services path: train on the built-in digits in this process, save, sample."""

from __future__ import annotations

from pathlib import Path

import torch

from data.mnist import MNIST_CLASS_NAMES, load_mnist
from training.images import make_grid, save_png, to_uint8
from training.local import train_in_process
from training.names import PresetName
from training.plots import loss_curves
from training.presets import get_preset

SAMPLES_PER_CLASS = 8
LOSS_CURVES = "loss.png"


def run_demo(
    preset: PresetName = "demo",
    out_dir: Path = Path("outputs/demo"),
    seed: int = 0,
    guidance_scale: float = 2.0,
    progress: bool = True,
) -> Path:
    """Train ``preset`` on MNIST, save it to ``out_dir/model`` and write
    ``out_dir/samples.png`` (one row per digit, DDPM over 100 respaced steps) and
    ``out_dir/loss.png`` (each stage's loss curve). Returns the grid's path."""
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    images, labels = load_mnist(image_size=32)
    config = get_preset(preset).for_data(32, 1, len(MNIST_CLASS_NAMES), MNIST_CLASS_NAMES)
    config = config.model_copy(update={"seed": seed})
    history: dict[str, list[tuple[int, float]]] = {}
    model = train_in_process(config, images, labels, progress=progress, history=history)
    model.save(out_dir / "model")
    save_png(loss_curves(history), out_dir / LOSS_CURVES)

    y = torch.arange(config.num_classes).repeat_interleave(SAMPLES_PER_CLASS)
    pixels = model.sample(
        y,
        guidance_scale=guidance_scale,
        sampler="ddpm",
        steps=min(100, config.diffusion.num_timesteps),
        generator=torch.Generator().manual_seed(seed),
    )
    return save_png(make_grid(to_uint8(pixels), ncols=SAMPLES_PER_CLASS), out_dir / "samples.png")
