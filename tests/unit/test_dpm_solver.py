"""DPM-Solver++(2M): its first step is DDIM, its error falls at second order on data whose
probability-flow solution is known, and on a trained network 20 of its steps land
closer to a 200-step DDIM chain than 20 DDIM steps do."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from training.diffusion import GaussianDiffusion, get_named_beta_schedule, space_timesteps
from training.diffusion.gaussian_diffusion import ddim_update, dpmpp_2m_update
from training.diffusion.schedules import log_snr_timesteps

MEAN, STD = 0.5, 1.5  # the toy data: every coordinate ~ N(MEAN, STD²)


class GaussianDataEps(nn.Module):
    """The exact ε-prediction for data ~ N(MEAN, STD²):
    E[ε | x_t] = σ_t(x_t − α_t·MEAN)/(α_t²·STD² + σ_t²)."""

    num_classes = 1

    def __init__(self, diffusion: GaussianDiffusion):
        super().__init__()
        self.register_buffer("alphas_cumprod", torch.from_numpy(diffusion.alphas_cumprod))

    def forward(self, x, t, y):
        ab = self.alphas_cumprod[t].to(x.dtype).reshape(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * MEAN) / (ab * STD**2 + 1 - ab)


def exact_flow_end(diffusion: GaussianDiffusion, x_T: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE keeps each coordinate's z-score under the marginal
    N(α_t·MEAN, α_t²·STD² + σ_t²): x_0 = MEAN + STD·(x_T − α_T·MEAN)/√(α_T²·STD² + σ_T²)."""
    ab = diffusion.alphas_cumprod[-1]
    return MEAN + STD * (x_T - math.sqrt(ab) * MEAN) / math.sqrt(ab * STD**2 + 1 - ab)


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(get_named_beta_schedule("linear", 1000))


def test_the_first_step_is_a_ddim_step(diffusion):
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    chain = diffusion.respaced(10)
    t = torch.full((3,), chain.num_timesteps - 1)
    coef = chain.coefficients(t, x)
    # No history at the first step: whatever x0_previous holds has weight 0.
    dpm, x0 = dpmpp_2m_update(coef, x, eps, torch.full_like(x, 7.0))
    torch.testing.assert_close(dpm, ddim_update(coef, x, eps, 0.0, None), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0, chain.predict_x0_from_eps(x, t, eps))


def test_the_last_step_returns_the_clean_prediction(diffusion):
    chain = diffusion.respaced(10)
    assert chain.dpm_sigma_ratio[0] == 0.0 and chain.dpm_data_coef[0] == pytest.approx(1.0)
    assert chain.dpm_history_weight[0] == 0.0 and chain.dpm_history_weight[-1] == 0.0
    assert (chain.dpm_history_weight[1:-1] > 0).all()


def _errors(diffusion, sampler, steps):
    model = GaussianDataEps(diffusion).double()
    x_T = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_flow_end(diffusion, x_T)
    errors = []
    for n in steps:
        x = diffusion.sample(model, x_T.shape, sampler=sampler, steps=n, x_T=x_T, device="cpu")
        errors.append(float((x - exact).abs().mean()))
    return errors


def test_error_falls_at_the_solvers_order(diffusion):
    steps = (20, 40, 80)
    orders = {}
    for sampler in ("ddim", "dpmpp_2m"):
        errors = _errors(diffusion, sampler, steps)
        orders[sampler] = [math.log2(a / b) for a, b in zip(errors[:-1], errors[1:], strict=True)]
    # Doubling the steps halves DDIM's error (first order) and at least quarters
    # DPM-Solver++'s (second order).
    assert all(0.9 < order < 1.2 for order in orders["ddim"]), orders
    assert all(order > 1.8 for order in orders["dpmpp_2m"]), orders


class TinyDenoiser(nn.Module):
    """A small conditional MLP ε_θ(x_t, t, y) over [B, 2, 4, 4] latents."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.label = nn.Embedding(self.num_classes + 1, 32)
        self.net = nn.Sequential(nn.Linear(32 + 32 + 16, 128), nn.SiLU(), nn.Linear(128, 128))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(128, 32))

    def forward(self, x, t, y):
        angles = (t.float() / 1000)[:, None] * (math.pi * 2.0 ** torch.arange(8))[None]
        features = [x.flatten(1), self.label(y), torch.sin(angles), torch.cos(angles)]
        return self.out(self.net(torch.cat(features, dim=1))).reshape(x.shape)


@pytest.fixture(scope="module")
def trained(diffusion):
    """TinyDenoiser fitted to two classes of patterned latents (with label dropout)."""
    torch.manual_seed(0)
    patterns = torch.randn(2, 2, 4, 4)
    model = TinyDenoiser()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(1500):
        y = torch.randint(0, 2, (256,))
        x0 = patterns[y] + 0.3 * torch.randn(256, 2, 4, 4)
        t = torch.randint(0, 1000, (256,))
        y_in = torch.where(torch.rand(256) < 0.1, torch.full_like(y, 2), y)
        loss = diffusion.training_losses(model, x0, t, y_in)["loss"].mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def test_twenty_dpm_solver_steps_are_closer_to_a_long_chain_than_ddim(diffusion, trained):
    x_T = torch.randn(64, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.arange(64) % 2

    def run(sampler, steps):
        return diffusion.sample(
            trained, x_T.shape, y=y, guidance_scale=1.0, sampler=sampler, steps=steps, x_T=x_T
        )

    reference = run("ddim", 200)
    ddim_gap = float((run("ddim", 20) - reference).pow(2).mean().sqrt())
    dpm_gap = float((run("dpmpp_2m", 20) - reference).pow(2).mean().sqrt())
    assert dpm_gap < 0.5 * ddim_gap, (dpm_gap, ddim_gap)


@pytest.mark.parametrize("steps", [1, 2, 5, 50, 99, 100])
def test_quadratic_and_log_snr_spacings_keep_exactly_the_steps_asked_for(steps, diffusion):
    kept = space_timesteps(100, steps, "quadratic")
    assert len(kept) == steps and kept == sorted(set(kept))
    assert kept[-1] == 99 and (steps == 1 or kept[0] == 0)
    if steps == 5:  # t = 99·(k/4)²: dense near the clean end
        assert kept == [0, 6, 25, 56, 99]
    short = GaussianDiffusion(get_named_beta_schedule("linear", 100))
    kept = log_snr_timesteps(short.alphas_cumprod, steps)
    assert len(kept) == steps and kept == sorted(set(kept))
    assert kept[-1] == 99 and (steps == 1 or kept[0] == 0)


def test_log_snr_spacing_is_even_in_log_snr(diffusion):
    kept = log_snr_timesteps(diffusion.alphas_cumprod, 10)
    ab = diffusion.alphas_cumprod[kept]
    gaps = np.diff(0.5 * np.log(ab / (1 - ab)))
    assert np.allclose(gaps, gaps.mean(), rtol=0.1)  # the nearest timesteps: within 10%
    assert kept[1] - kept[0] < kept[-1] - kept[-2]  # crowded where log-SNR moves fastest
