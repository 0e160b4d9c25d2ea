"""Named beta schedules and timestep respacing.

A named schedule never changes once committed: checkpoints and registered models
refer to it by name, and changing it would silently change what they sample.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

BetaScheduleName = Literal["linear", "cosine"]
# uniform: evenly spaced in t (DDPM, DDIM). quadratic: t ∝ (k/n)², denser near the clean
# end (DPM-Solver's "time_quadratic"). log_snr: evenly spaced in λ = log(α/σ), the variable
# DPM-Solver integrates in (its "logSNR", Lu et al. 2022).
TimestepSpacing = Literal["uniform", "quadratic", "log_snr"]


def get_named_beta_schedule(name: BetaScheduleName, num_timesteps: int) -> np.ndarray:
    """Return β_t for t = 0 … T−1 as float64 [T].

    ``linear``: Ho et al. 2020, scaled so that any T spans the same ᾱ range as T = 1000.
    ``cosine``: Nichol & Dhariwal 2021, ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), β clipped to 0.999.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(
            num_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(f"unknown beta schedule {name!r}; expected 'linear' or 'cosine'")


def betas_for_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous ᾱ(s), s ∈ [0, 1], into β_t = 1 − ᾱ((t+1)/T) / ᾱ(t/T)."""
    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


def space_timesteps(
    num_timesteps: int, steps: int, spacing: TimestepSpacing = "uniform"
) -> list[int]:
    """Pick ``steps`` timesteps out of 0 … T−1, in increasing order, always keeping 0 and T−1.

    Keeping T−1 makes sampling start from pure noise; keeping 0 makes the last
    step the noiseless one. ``uniform`` may keep fewer than ``steps`` where rounding
    meets (never for steps ≤ T/2); ``quadratic`` keeps exactly ``steps``.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    if spacing == "uniform":
        kept = np.round(np.linspace(0, num_timesteps - 1, steps)).astype(int)
        return sorted(set(int(t) for t in kept))
    if spacing != "quadratic":
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected 'uniform' or 'quadratic'")
    spaced = np.round((num_timesteps - 1) * np.linspace(0, 1, steps) ** 2)
    return _strictly_increasing(spaced, num_timesteps)


def log_snr_timesteps(alphas_cumprod: np.ndarray, steps: int) -> list[int]:
    """``steps`` timesteps whose λ_t = log(√ᾱ_t/√(1−ᾱ_t)) are as evenly spaced as the
    schedule allows, from T−1 to 0: each target λ takes its nearest timestep."""
    num_timesteps = len(alphas_cumprod)
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    log_snr = 0.5 * np.log(alphas_cumprod / (1.0 - alphas_cumprod))  # decreasing in t
    targets = np.linspace(log_snr[0], log_snr[-1], steps)
    nearest = np.abs(log_snr[None, :] - targets[:, None]).argmin(axis=1)
    return _strictly_increasing(nearest, num_timesteps)


def _strictly_increasing(values: np.ndarray, num_timesteps: int) -> list[int]:
    """Sorted timesteps from 0 to T−1 made distinct: rounding may repeat a timestep where
    they crowd (near 0), so each is pushed past the one before, then back below the next."""
    kept = [int(t) for t in np.sort(values)]
    for k in range(1, len(kept)):
        kept[k] = max(kept[k], kept[k - 1] + 1)
    kept[-1] = min(kept[-1], num_timesteps - 1)
    for k in range(len(kept) - 2, -1, -1):
        kept[k] = min(kept[k], kept[k + 1] - 1)
    return kept


def respace_betas(alphas_cumprod: np.ndarray, kept: list[int]) -> np.ndarray:
    """Betas of a chain that visits only ``kept`` timesteps with the same ᾱ there.

    β'_k = 1 − ᾱ_{kept[k]} / ᾱ_{kept[k−1]} (with ᾱ_{−1} = 1), so that ∏(1 − β') at
    each kept step equals the original ᾱ (Nichol & Dhariwal 2021, §4).
    """
    betas, last = [], 1.0
    for t in kept:
        betas.append(1.0 - alphas_cumprod[t] / last)
        last = alphas_cumprod[t]
    return np.array(betas, dtype=np.float64)
