"""Pictures for MLflow and the demo folder, as uint8 [H, W, 3] arrays: sample grids with
their rows named, loss curves, the exposure-bias curve. Drawn with Pillow's built-in font
and matplotlib's Agg backend (no display, nothing downloaded)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from training.diffusion.exposure import ExposureCurve


def label_rows(grid: np.ndarray, names: Sequence[str], padding: int = 2) -> np.ndarray:
    """A grid of ``len(names)`` equal rows (from :func:`training.images.make_grid`) with
    a column on its left naming each row, white on black. uint8 [H, W, C] → [H, W', 3]."""
    rows = len(names)
    if rows == 0:
        return grid
    height = (grid.shape[0] - padding) // rows
    font = ImageFont.load_default(size=max(8, min(14, height - 4)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(int(probe.textlength(str(n), font=font)) for n in names) + 8
    rgb = np.repeat(grid, 3, axis=-1) if grid.shape[-1] == 1 else grid[..., :3]
    canvas = Image.new("RGB", (width + rgb.shape[1], rgb.shape[0]))
    canvas.paste(Image.fromarray(np.ascontiguousarray(rgb)), (width, 0))
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(names):
        middle = padding + row * height + (height - padding) / 2
        draw.text((width - 4, middle), str(name), fill="white", font=font, anchor="rm")
    return np.asarray(canvas)


def _figure_pixels(figure) -> np.ndarray:
    from matplotlib import pyplot as plt

    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def loss_curves(history: Mapping[str, Sequence[tuple[int, float]]]) -> np.ndarray:
    """One panel per stage: its loss over steps (log scale where all are positive)."""
    plt = _pyplot()
    stages = [s for s, points in history.items() if points]
    figure, axes = plt.subplots(1, max(1, len(stages)), figsize=(4 * max(1, len(stages)), 3))
    for ax, stage in zip(np.atleast_1d(axes), stages, strict=False):
        steps, losses = zip(*history[stage], strict=True)
        ax.plot(steps, losses)
        if min(losses) > 0 and max(losses) > 10 * min(losses):
            ax.set_yscale("log")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    return _figure_pixels(figure)


def exposure_plot(curve: ExposureCurve) -> np.ndarray:
    """√(‖ε̂‖² on the model's own x̂_t / on noised data) over t."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.2), dpi=100)
    axes.plot(curve.timesteps, curve.ratio, marker="o")
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.invert_xaxis()
    axes.set_xlabel("timestep t (noisy → clean)")
    axes.set_ylabel("‖ε̂(x̂_t)‖ / ‖ε̂(x_t)‖")
    axes.set_title(f"exposure bias (mean excess {curve.summary:+.3f})")
    return _figure_pixels(figure)
