"""Fréchet distance and PSNR against closed forms."""

import numpy as np
import pytest
import torch

from training.evaluation.metrics import frechet_distance, psnr


def test_frechet_distance_of_diagonal_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mean_a, mean_b = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 1.0])
    std_a, std_b = np.array([1.0, 2.0, 0.5]), np.array([3.0, 1.0, 0.5])
    a = mean_a + std_a * rng.standard_normal((200_000, 3))
    b = mean_b + std_b * rng.standard_normal((200_000, 3))
    # Diagonal covariances: FD = ‖μa − μb‖² + Σ (σa − σb)².
    expected = ((mean_a - mean_b) ** 2).sum() + ((std_a - std_b) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_is_zero_for_identical_sets_and_symmetric():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((500, 8)) @ rng.standard_normal((8, 8))
    b = rng.standard_normal((400, 8)) * 2 + 1
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_frechet_distance_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_psnr_of_a_known_error():
    reference = torch.zeros(2, 1, 4, 4)
    # MSE 0.01 on a peak-to-peak range of 2: 10·log10(4 / 0.01) ≈ 26.02 dB.
    assert psnr(reference, reference + 0.1) == pytest.approx(26.0206, abs=1e-3)
    assert psnr(reference, reference) == float("inf")
