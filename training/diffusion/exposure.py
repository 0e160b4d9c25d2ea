"""Exposure bias: how it is measured, and epsilon scaling to reduce it at sampling
time (Ning et al., ICLR 2024, "Elucidating the Exposure Bias in Diffusion Models").

During sampling the network sees its own x̂_t, not a q_sample of the data, and its
noise prediction comes out larger than at training (‖ε_θ(x̂_t, t)‖ > ‖ε_θ(x_t, t)‖).
Epsilon scaling divides the prediction by λ_t ≥ 1 before each step, training-free:

    ε̂_scaled = ε̂ / λ_t,   λ_t = b + k · t / T

with t the model timestep (0 … T−1, T the training chain's length), so one (b, k)
means the same at any step count. The paper's default is the constant schedule
(k = 0) with b slightly above 1 (1.004–1.017 for ADM models at 100 steps, more at
fewer steps); b = 1, k = 0 leaves sampling unchanged, and is the default here until
measured on a model. Measured on this project's digits models (``benchmarks/RESULTS.md``)
the best b lies *below* 1 at few DDIM or DPM-Solver++ steps: which b is best depends on
the model, the sampler and the step count, so it is searched per version on the val
split (:mod:`training.evaluation.eps_search`) and kept with it as
:class:`EpsScalingDefaults`, which the endpoint applies to requests that leave
``eps_scaling`` out.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from training.diffusion.gaussian_diffusion import GaussianDiffusion

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


@dataclass(frozen=True)
class EpsScalingDefaults:
    """A model version's b per sampler and step count, as searched on its val split:
    ``{"ddim": {10: 0.98, 20: 0.98}, "dpmpp_2m": {20: 0.99}}``. A request uses the b of
    its sampler's searched step count nearest to its own (on a log scale); 1 (off) for
    a sampler that was not searched."""

    table: dict[str, dict[int, float]]

    def for_request(self, sampler: str, steps: int) -> float:
        searched = self.table.get(sampler)
        if not searched:
            return 1.0
        nearest = min(searched, key=lambda n: (abs(math.log(n / steps)), n))
        return searched[nearest]

    def to_json(self) -> str:
        table = {
            s: {str(n): b for n, b in sorted(steps.items())} for s, steps in self.table.items()
        }
        return json.dumps(table, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> EpsScalingDefaults:
        """The defaults a registry tag holds; none (every b = 1) for no tag. ValueError
        for a tag that is not such a table or holds a b outside [0.5, 2]."""
        if not text:
            return cls({})
        try:
            raw = json.loads(text)
            table = {
                str(s): {int(n): float(b) for n, b in steps.items()} for s, steps in raw.items()
            }
        except (ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"not an epsilon scaling table: {text[:200]!r} ({error})") from None
        for steps in table.values():
            for n, b in steps.items():
                if n < 1 or not 0.5 <= b <= 2.0:
                    raise ValueError(f"epsilon scaling table entry {n}: {b} is out of range")
        return cls(table)


def check_eps_scaling(b: EpsScale, k: EpsScale) -> None:
    """The user-facing bounds: b in [0.5, 2], |k| ≤ 1, and λ_t > 0 over t ∈ [0, T)."""
    b, k = torch.as_tensor(b, dtype=torch.float64), torch.as_tensor(k, dtype=torch.float64)
    if bool(((b < 0.5) | (b > 2.0)).any()):
        raise ValueError("eps_scaling (b of λ_t = b + k·t/T) must lie in [0.5, 2]; 1 is off")
    if bool((k.abs() > 1.0).any()):
        raise ValueError("eps_scaling_slope (k of λ_t = b + k·t/T) must lie in [-1, 1]")
    if bool((b + torch.minimum(k, torch.zeros_like(k)) <= 0).any()):
        raise ValueError("epsilon scaling must stay positive: b + k > 0 when k < 0")


@dataclass(frozen=True)
class ExposureCurve:
    """The exposure bias of a network along a DDIM chain (Ning et al. 2024, §4: the
    network's noise prediction on its own x̂_t comes out larger than on a q_sample of
    the data at the same t).

    ``timesteps``: model timesteps of the chain, from noisy to clean. ``sampling``: mean
    squared ε̂ per dimension on the chain's own x̂_t; ``training``: the same on
    q_sample(z₀, t) of real data z₀ with the same labels. ``ratio`` = √(sampling /
    training), 1 without exposure bias; ``summary`` its mean excess over 1."""

    timesteps: tuple[int, ...]
    sampling: tuple[float, ...]
    training: tuple[float, ...]

    @property
    def ratio(self) -> tuple[float, ...]:
        """Per timestep; a network that predicts ε̂ = 0 on data (untrained) counts as 1
        where it also does on its own chain, else as infinitely biased."""
        pairs = zip(self.sampling, self.training, strict=True)
        return tuple(math.sqrt(s / t) if t > 0 else (1.0 if s == 0 else math.inf) for s, t in pairs)

    @property
    def summary(self) -> float:
        return sum(r - 1.0 for r in self.ratio) / len(self.ratio)


@torch.no_grad()
def exposure_curve(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    z0: Tensor,
    y: Tensor | None,
    steps: int,
    generator: torch.Generator,
) -> ExposureCurve:
    """Run a DDIM chain (η = 0, no guidance) of ``steps`` from noise for the labels
    ``y`` (long [B] or None) beside the real latents ``z0`` [B, C, H, W] (scaled, as
    the denoiser sees them), and compare ε̂ on both at every step."""
    chain = diffusion.chain("ddim", steps)
    x = torch.randn(z0.shape, generator=generator).to(z0.device)
    timesteps, sampling, training = [], [], []
    for i in reversed(range(chain.num_timesteps)):
        t = torch.full((len(z0),), i, dtype=torch.long, device=z0.device)
        t_model = chain._model_timesteps(t)
        eps = model(x, t_model, y).float()
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        eps_data = model(diffusion.q_sample(z0, t_model, noise), t_model, y).float()
        timesteps.append(int(t_model[0]))
        sampling.append(eps.pow(2).mean().item())
        training.append(eps_data.pow(2).mean().item())
        x = chain.ddim_step(x, t, eps, 0.0, None)
    return ExposureCurve(tuple(timesteps), tuple(sampling), tuple(training))
