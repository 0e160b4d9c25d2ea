"""uint8 images → the bytes of a response: one PNG grid, base64 PNGs, or an .npy array."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from training.images import make_grid

MEDIA_TYPES = {"png": "image/png", "npy": "application/x-npy", "json": "application/json"}


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, C] with C = 1 or 3 → PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def grid_png(images: np.ndarray) -> bytes:
    """uint8 [N, H, W, C] → one PNG of a near-square grid (2-pixel black padding)."""
    return png_bytes(make_grid(images))


def base64_pngs(images: np.ndarray) -> list[str]:
    """uint8 [N, H, W, C] → one base64-encoded PNG per image."""
    return [base64.b64encode(png_bytes(image)).decode("ascii") for image in images]


def npy_bytes(images: np.ndarray) -> bytes:
    """uint8 [N, H, W, C] → ``numpy.save`` bytes (``np.load(io.BytesIO(body))``)."""
    buffer = io.BytesIO()
    np.save(buffer, images, allow_pickle=False)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes → uint8 [H, W, C]."""
    image = np.asarray(Image.open(io.BytesIO(data)))
    return image[..., None] if image.ndim == 2 else image
