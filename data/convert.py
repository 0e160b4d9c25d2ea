"""Turn any input image into the dataset's format: uint8 [S, S, C], then lossless PNG.

The rules, applied in this order to every input:

- only PNG, JPEG, WebP, BMP and GIF are opened, whatever the file is called (no other
  Pillow decoder ever sees the bytes); an image of more than ``max_pixels`` pixels
  (default: Pillow's own limit) is refused as too large from its header, before any
  pixel is decoded; then decode (the first frame of an animation) and apply the EXIF
  orientation;
- 16-bit and 32-bit integer images are scaled to 8 bits (v / 257, rounded), float
  images are clipped to [0, 255];
- transparency (RGBA, LA, P with a transparent colour) is composited over black;
- CMYK, YCbCr, P and the rest go to RGB; then RGB → L (ITU-R 601 luma) for 1 channel
  or L → RGB (copied) for 3;
- an image that is not S×S is resized so its shorter side is S (Lanczos) and
  centre-cropped to S×S.

An input that cannot be decoded raises :class:`BadInput` with the reason, which the
writer records in the manifest.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageOps

# Fixed encoder settings: the same pixels always give the same PNG bytes.
PNG_OPTIONS = {"format": "PNG", "compress_level": 6, "optimize": False}
DECODERS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS


class BadInput(Exception):
    """An input that cannot become a sample; ``str(error)`` is the reason."""


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes fully (so truncated files fail here, not later)."""
    if not data:
        raise BadInput("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=DECODERS)
    except Image.DecompressionBombError as error:
        raise BadInput(f"too large: {error}") from error
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise BadInput(
            f"not a decodable image ({type(error).__name__}: {_plain(error)}); only PNG, JPEG, "
            "WebP, BMP and GIF files are read"
        ) from error
    check_pixels(*image.size, max_pixels)
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as error:
        reason = f"{type(error).__name__}: {_plain(error)}"
        raise BadInput(f"not a decodable image ({reason})") from error


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """BadInput "too large" for an image of more than ``max_pixels`` pixels."""
    if width * height > max_pixels:
        raise BadInput(
            f"too large: {width}×{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} (--max-image-pixels)"
        )


def to_rgb_or_l(image: Image.Image) -> Image.Image:
    """Any Pillow mode → ``L`` or ``RGB`` (8 bits per channel, alpha composited on black)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        wide = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image).convert("RGB")
    if image.mode == "1":
        image = image.convert("L")
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return image


def fit(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (Lanczos), then centre-crop to size×size."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def prepare(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """Any decoded image → uint8 [size, size, channels] in 0 … 255."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    image = fit(to_rgb_or_l(image), size)
    image = image.convert("L" if channels == 1 else "RGB")
    return np.asarray(image, dtype=np.uint8).reshape(size, size, channels)


def array_to_image(array: np.ndarray) -> Image.Image:
    """uint8 [H, W] or [H, W, C] with C in 1, 3, 4 → a Pillow image (L, RGB or RGBA)."""
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return Image.fromarray(array, "L")
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return Image.fromarray(array, "RGB" if array.shape[-1] == 3 else "RGBA")
    raise ValueError(f"expected an image [H, W] or [H, W, 1|3|4], got shape {array.shape}")


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W, 1|3] → PNG bytes (L or RGB), byte-identical for identical pixels."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, **PNG_OPTIONS)
    return buffer.getvalue()


def decode_png(data: bytes, channels: int) -> np.ndarray:
    """PNG bytes written by :func:`encode_png` → uint8 [H, W, channels]."""
    image = Image.open(io.BytesIO(data))
    image.load()
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels.reshape(*pixels.shape[:2], channels)


def _plain(error: Exception) -> str:
    """The error's text without object addresses (``<_io.BytesIO object at 0x…>``): a
    reason is written into the manifest, which must not depend on the process."""
    return re.sub(r"<([\w.]+) object at 0x[0-9a-f]+>", r"<\1>", str(error))
