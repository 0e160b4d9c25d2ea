"""Epsilon scaling (Ning et al. 2024): ε̂ / λ_t with λ_t = b + k·t/T, in every sampler."""

import pytest
import torch
from torch import nn

from training.diffusion import GaussianDiffusion, get_named_beta_schedule
from training.diffusion.exposure import epsilon_scale

SHAPE = (3, 2, 4, 4)
T = 50


ALPHAS_CUMPROD = torch.tensor(
    GaussianDiffusion(get_named_beta_schedule("linear", T)).alphas_cumprod, dtype=torch.float32
)


class Wavy(nn.Module):
    """ε(x, t, y): nearly the exact noise of data at 0 (x / √(1−ᾱ_t)), with a small
    smooth part that depends on x, t and the label (3 is the learned null label)."""

    num_classes = 3

    def forward(self, x, t, y):
        y = torch.full((x.shape[0],), 3) if y is None else y
        sigma = (1 - ALPHAS_CUMPROD[t]).sqrt().reshape(-1, 1, 1, 1)
        shift = (y.to(x.dtype) + 1).reshape(-1, 1, 1, 1) / 50
        return 0.97 * x / sigma + 0.05 * torch.sin(x) + shift


class Divided(nn.Module):
    """The same network with its output divided by b + k·t/T: what scaling must equal."""

    num_classes = 3

    def __init__(self, b: float, k: float):
        super().__init__()
        self.inner, self.b, self.k = Wavy(), b, k

    def forward(self, x, t, y):
        return self.inner(x, t, y) / (self.b + self.k * t.to(x.dtype) / T).reshape(-1, 1, 1, 1)


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(get_named_beta_schedule("linear", T))


def _sample(diffusion, model, sampler, **kw):
    generators = [torch.Generator().manual_seed(10 + i) for i in range(SHAPE[0])]
    y = torch.tensor([0, 1, 2])
    return diffusion.sample(
        model,
        SHAPE,
        y=y,
        guidance_scale=2.0,
        sampler=sampler,
        steps=10,
        generator=generators,
        device="cpu",
        **kw,
    )


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_lambda_one_is_sampling_unchanged(diffusion, sampler):
    plain = _sample(diffusion, Wavy(), sampler)
    ones = _sample(diffusion, Wavy(), sampler, eps_scaling=torch.ones(3), eps_scaling_slope=0.0)
    assert torch.equal(plain, ones)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize(("b", "k"), [(1.02, 0.0), (1.0, 0.05), (1.01, -0.01)])
def test_a_scaled_chain_is_the_chain_of_the_divided_network(diffusion, sampler, b, k):
    scaled = _sample(diffusion, Wavy(), sampler, eps_scaling=b, eps_scaling_slope=k)
    divided = _sample(diffusion, Divided(b, k), sampler)
    assert torch.allclose(scaled, divided, rtol=1e-4, atol=1e-7)
    plain = _sample(diffusion, Wavy(), sampler)
    assert (scaled - plain).abs().max() > 1e-5  # it did change the chain


def test_each_row_keeps_its_own_scaling(diffusion):
    b = torch.tensor([1.0, 1.03, 1.06])
    together = _sample(diffusion, Wavy(), "ddim", eps_scaling=b)
    for row in range(3):
        alone = _sample(diffusion, Wavy(), "ddim", eps_scaling=float(b[row]))
        assert torch.allclose(together[row], alone[row], atol=1e-6)


def test_the_schedule_is_linear_in_the_model_timestep():
    t = torch.tensor([0, 25, 49])
    assert torch.allclose(epsilon_scale(t, T, 1.01, 0.1), torch.tensor([1.01, 1.06, 1.108]))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"eps_scaling": 0.2}, r"\[0.5, 2\]"),
        ({"eps_scaling_slope": 3.0}, r"\[-1, 1\]"),
        ({"eps_scaling": 0.6, "eps_scaling_slope": -0.9}, "positive"),
    ],
)
def test_scalings_out_of_range_are_refused(diffusion, kw, message):
    with pytest.raises(ValueError, match=message):
        _sample(diffusion, Wavy(), "ddim", **kw)


class ScaledExact(nn.Module):
    """c·x/σ_t: for data at 0 the exact noise predictor (c = 1), or one that
    overshoots by c. Every chain state is then a known multiple of x_T."""

    num_classes = 3

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, t, y):
        return self.c * x / (1 - ALPHAS_CUMPROD[t]).sqrt().reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("c", [1.0, 1.1])
def test_the_exposure_curve_matches_its_closed_form_on_a_known_network(diffusion, c):
    import numpy as np

    from training.diffusion.exposure import exposure_curve

    z0 = torch.zeros(64, 2, 8, 8)
    curve = exposure_curve(
        ScaledExact(c), diffusion, z0, None, 10, torch.Generator().manual_seed(3)
    )
    x_T = torch.randn(z0.shape, generator=torch.Generator().manual_seed(3))
    chain = diffusion.chain("ddim", 10)
    abar = chain.alphas_cumprod
    abar_prev = np.append(1.0, abar[:-1])
    factor, expected = 1.0, []
    for i in reversed(range(10)):  # x_t = factor · x_T along the chain
        sigma, sigma_prev = np.sqrt(1 - abar[i]), np.sqrt(1 - abar_prev[i])
        expected.append(c**2 * factor**2 * x_T.pow(2).mean().item() / sigma**2)
        factor *= np.sqrt(abar_prev[i]) * (1 - c) / np.sqrt(abar[i]) + c * sigma_prev / sigma
    assert curve.timesteps == tuple(int(t) for t in chain.timestep_map[::-1])
    assert np.allclose(curve.sampling, expected, rtol=1e-4)
    assert np.allclose(curve.training, c**2, rtol=0.05)  # ε̂ = c·n on q_sample(0, t)
    if c == 1.0:  # the exact network: no exposure bias
        assert abs(curve.summary) < 0.05
    else:  # x̂₀ = −0.1·x/√ᾱ: each step shrinks x̂_t, so ε̂ is smaller than in training
        assert curve.summary < -0.2 and curve.ratio[-1] < curve.ratio[0]


def test_a_network_that_predicts_zero_everywhere_shows_no_bias():
    from training.diffusion.exposure import ExposureCurve

    assert ExposureCurve((9, 0), (0.0, 4.0), (0.0, 1.0)).ratio == (1.0, 2.0)
    assert ExposureCurve((9,), (1.0,), (0.0,)).summary == float("inf")


def test_a_version_default_follows_the_nearest_searched_step_count():
    from training.diffusion.exposure import EpsScalingDefaults

    defaults = EpsScalingDefaults({"ddim": {10: 0.97, 50: 0.99}, "dpmpp_2m": {20: 0.98}})
    assert [defaults.for_request("ddim", n) for n in (5, 10, 20, 25, 100)] == [
        0.97,
        0.97,
        0.97,  # 20 is nearer 10 than 50 on a log scale (2× against 2.5×)
        0.99,
        0.99,
    ]
    assert defaults.for_request("dpmpp_2m", 200) == 0.98
    assert defaults.for_request("ddpm", 100) == 1.0  # never searched: off
    again = EpsScalingDefaults.from_json(defaults.to_json())
    assert again == defaults and EpsScalingDefaults.from_json(None).table == {}


@pytest.mark.parametrize(
    "tag", ['{"ddim": {"10": 3.0}}', '{"ddim": {"0": 1.0}}', "[1, 2]", '{"ddim": 0.98}', "nope"]
)
def test_a_table_that_is_not_one_is_refused(tag):
    from training.diffusion.exposure import EpsScalingDefaults

    with pytest.raises(ValueError):
        EpsScalingDefaults.from_json(tag)


def test_search_cells_are_sampler_and_steps():
    from training.evaluation.eps_search import parse_cells

    assert parse_cells("ddim10,dpmpp_2m20, ddpm100") == (
        ("ddim", 10),
        ("dpmpp_2m", 20),
        ("ddpm", 100),
    )
    for bad in ("euler10", "ddim", "10", "ddim0"):
        with pytest.raises(ValueError, match="SAMPLER\\+STEPS"):
            parse_cells(bad)
