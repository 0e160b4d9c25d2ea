"""Sample-quality metrics that need only numpy and torch."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D]:
    ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}) (Heusel et al. 2017).

    The symmetric form keeps every matrix square root that of a symmetric PSD matrix,
    taken by eigendecomposition in float64."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two [N, D] feature sets with the same D, got {a.shape}, {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least 2 samples in each feature set")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(cov_a)
    cross = _psd_sqrt(root_a @ cov_b @ root_a)
    value = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cross)
    return float(max(value, 0.0))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def psnr(reference: Tensor, reconstruction: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of pixels in [-1, 1] (peak-to-peak range 2)."""
    mse = torch.mean((reference.double() - reconstruction.double().clamp(-1, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * np.log10(4.0 / mse)
