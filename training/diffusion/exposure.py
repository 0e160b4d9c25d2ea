"""Exposure bias at sampling time: epsilon scaling (Ning et al., ICLR 2024,
"Elucidating the Exposure Bias in Diffusion Models", §5).

During sampling the network sees its own x̂_t, not a q_sample of the data, and its
noise prediction comes out larger than at training (‖ε_θ(x̂_t, t)‖ > ‖ε_θ(x_t, t)‖).
Epsilon scaling divides the prediction by λ_t ≥ 1 before each step, training-free:

    ε̂_scaled = ε̂ / λ_t,   λ_t = b + k · t / T

with t the model timestep (0 … T−1, T the training chain's length), so one (b, k)
means the same at any step count. The paper's default is the constant schedule
(k = 0) with b slightly above 1 (1.004–1.017 for ADM models at 100 steps, more at
fewer steps); b = 1, k = 0 leaves sampling unchanged, and is the default here until
measured on a model.
"""

from __future__ import annotations

import torch
from torch import Tensor

EpsScale = float | Tensor  # one value, or one per sample [B]


def epsilon_scale(
    t_model: Tensor, num_train_timesteps: int, b: EpsScale = 1.0, k: EpsScale = 0.0
) -> Tensor:
    """λ_t = b + k · t / T for long timesteps [B] of the training chain; float [B].
    ``b`` and ``k`` are floats or per-sample tensors [B]."""
    b = torch.as_tensor(b, dtype=torch.float32, device=t_model.device)
    k = torch.as_tensor(k, dtype=torch.float32, device=t_model.device)
    scale = b + k * t_model.float() / num_train_timesteps
    if bool((scale <= 0).any()):
        raise ValueError("epsilon scaling must stay positive: b + k·t/T > 0 at every t")
    return scale.expand(t_model.shape)


def scale_eps(eps: Tensor, lam: Tensor) -> Tensor:
    """ε̂ / λ_t with λ_t [B] broadcast over every other dimension of ε̂ [B, …]."""
    return eps / lam.to(eps.dtype).reshape(-1, *([1] * (eps.dim() - 1)))


def check_eps_scaling(b: EpsScale, k: EpsScale) -> None:
    """The user-facing bounds: b in [0.5, 2], |k| ≤ 1, and λ_t > 0 over t ∈ [0, T)."""
    b, k = torch.as_tensor(b, dtype=torch.float64), torch.as_tensor(k, dtype=torch.float64)
    if bool(((b < 0.5) | (b > 2.0)).any()):
        raise ValueError("eps_scaling (b of λ_t = b + k·t/T) must lie in [0.5, 2]; 1 is off")
    if bool((k.abs() > 1.0).any()):
        raise ValueError("eps_scaling_slope (k of λ_t = b + k·t/T) must lie in [-1, 1]")
    if bool((b + torch.minimum(k, torch.zeros_like(k)) <= 0).any()):
        raise ValueError("epsilon scaling must stay positive: b + k > 0 when k < 0")
