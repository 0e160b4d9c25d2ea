"""Model pixels back to uint8 images, and sample grids as PNG.

The other direction, uint8 → pixels, is :func:`data.reader.to_pixels`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(pixels: Tensor) -> np.ndarray:
    """float [B, C, H, W] in [-1, 1] (clamped) → uint8 [B, H, W, C]."""
    x = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, ncols: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile uint8 [B, H, W, C] into one uint8 [rows·(H+p)+p, cols·(W+p)+p, C] image."""
    b, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    grid = np.zeros((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, ncols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write uint8 [H, W, C] (C = 1 or 3) as a PNG file, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
    return path
