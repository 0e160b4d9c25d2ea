"""The diffusion math against closed-form formulas, in float64 on random inputs."""

import numpy as np
import pytest
import torch

from training.diffusion import GaussianDiffusion, get_named_beta_schedule, space_timesteps

T = 1000


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(get_named_beta_schedule("linear", T))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 5, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(8, 4, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 10, 250, 500, 998, 999])
    return x0, noise, t


def _col(values: np.ndarray, t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(values[t.numpy()]).reshape(-1, 1, 1, 1)


def test_schedules_are_float64_and_monotone():
    for name in ("linear", "cosine"):
        betas = get_named_beta_schedule(name, T)
        assert betas.dtype == np.float64 and betas.shape == (T,)
        assert (betas > 0).all() and (betas < 1).all()
        assert (np.diff(np.cumprod(1 - betas)) < 0).all()
    linear = get_named_beta_schedule("linear", T)
    assert linear[0] == pytest.approx(1e-4) and linear[-1] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        get_named_beta_schedule("quadratic", T)


def test_alphas_cumprod_is_the_product(diffusion):
    betas = get_named_beta_schedule("linear", T)
    assert diffusion.alphas_cumprod.dtype == np.float64
    np.testing.assert_allclose(diffusion.alphas_cumprod[10], np.prod(1 - betas[:11]), rtol=1e-12)


def test_q_sample_matches_closed_form(diffusion, batch):
    x0, noise, t = batch
    ab = _col(np.cumprod(1 - diffusion.betas), t)
    expected = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), expected, rtol=1e-12, atol=1e-12)


def test_predict_x0_inverts_q_sample(diffusion, batch):
    x0, noise, t = batch
    x_t = diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(
        diffusion.predict_x0_from_eps(x_t, t, noise), x0, rtol=1e-9, atol=1e-9
    )


def test_posterior_matches_closed_form(diffusion, batch):
    x0, noise, t = batch
    x_t = diffusion.q_sample(x0, t, noise)
    betas = diffusion.betas
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    beta, a_t, abt, abp = (_col(v, t) for v in (betas, 1 - betas, ab, ab_prev))
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, t)
    expected_mean = beta * abp.sqrt() / (1 - abt) * x0 + (1 - abp) * a_t.sqrt() / (1 - abt) * x_t
    expected_var = beta * (1 - abp) / (1 - abt)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, expected_var.expand_as(x_t), rtol=1e-12, atol=1e-15)
    nonzero = t > 0
    torch.testing.assert_close(log_var[nonzero], var[nonzero].log(), rtol=1e-12, atol=1e-12)


def test_posterior_mean_from_x0_hat_equals_eps_form(diffusion, batch):
    """μ̃(x̂_0(ε̂), x_t) = (x_t − β_t/√(1−ᾱ_t)·ε̂)/√α_t for an arbitrary ε̂."""
    x0, noise, t = batch
    x_t = diffusion.q_sample(x0, t, noise)
    eps_hat = torch.randn_like(x_t)
    x0_hat = diffusion.predict_x0_from_eps(x_t, t, eps_hat)
    mean, _, _ = diffusion.q_posterior_mean_variance(x0_hat, x_t, t)
    beta, a_t = _col(diffusion.betas, t), _col(1 - diffusion.betas, t)
    abt = _col(np.cumprod(1 - diffusion.betas), t)
    eps_form = (x_t - beta / (1 - abt).sqrt() * eps_hat) / a_t.sqrt()
    torch.testing.assert_close(mean, eps_form, rtol=1e-9, atol=1e-9)


def test_respaced_alphas_cumprod_match_at_kept_steps(diffusion):
    for steps in (1, 10, 50, 333, T):
        kept = space_timesteps(T, steps)
        assert len(kept) == steps and kept[-1] == T - 1
        spaced = diffusion.respaced(steps)
        assert spaced.num_timesteps == steps
        np.testing.assert_allclose(spaced.alphas_cumprod, diffusion.alphas_cumprod[kept], rtol=1e-9)
        np.testing.assert_array_equal(spaced.timestep_map, kept)
    assert diffusion.respaced(T) is diffusion
    assert diffusion.respaced(50) is diffusion.respaced(50)
    with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
        diffusion.respaced(1001)


def test_bad_betas_are_rejected():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        GaussianDiffusion(np.array([0.1, 0.0, 0.2]))
