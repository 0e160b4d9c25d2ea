"""DDPM-IP: the target is the unperturbed noise, the input is built from the perturbed one."""

import pytest
import torch
from torch import nn

from training.diffusion import GaussianDiffusion, get_named_beta_schedule

GAMMA = 0.1


class ReturnsNoise(nn.Module):
    """A model that knows x0 and answers with the clean or the perturbed noise."""

    def __init__(self, diffusion, x0, clean_noise, perturbed: bool):
        super().__init__()
        self.diffusion, self.x0, self.clean_noise, self.perturbed = (
            diffusion,
            x0,
            clean_noise,
            perturbed,
        )
        self.num_classes = 0

    def forward(self, x_t, t, y):
        if not self.perturbed:
            return self.clean_noise
        # Solve x_t = √ᾱ x0 + √(1−ᾱ) n for n: the noise that actually built x_t.
        ab = torch.from_numpy(self.diffusion.alphas_cumprod)[t].reshape(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * self.x0) / (1 - ab).sqrt()


@pytest.fixture
def setup():
    d = GaussianDiffusion(get_named_beta_schedule("linear", 1000))
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 4, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 4, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 100, 500, 900, 999])
    return d, x0, noise, t


def test_clean_noise_has_zero_loss_under_input_perturbation(setup):
    d, x0, noise, t = setup
    model = ReturnsNoise(d, x0, noise, perturbed=False)
    loss = d.training_losses(model, x0, t, noise=noise, input_perturbation=GAMMA)["loss"]
    assert loss.shape == (6,)
    torch.testing.assert_close(loss, torch.zeros(6, dtype=loss.dtype))


def test_perturbed_noise_is_penalised(setup):
    d, x0, noise, t = setup
    model = ReturnsNoise(d, x0, noise, perturbed=True)
    torch.manual_seed(0)
    loss = d.training_losses(model, x0, t, noise=noise, input_perturbation=GAMMA)["loss"]
    # The model returns ε + γξ, so the loss is γ²·mean(ξ²) ≈ 0.01 per sample.
    assert (loss > 0.002).all() and (loss < 0.03).all()


def test_gamma_zero_is_plain_ddpm(setup):
    d, x0, noise, t = setup
    model = ReturnsNoise(d, x0, noise, perturbed=True)
    loss = d.training_losses(model, x0, t, noise=noise, input_perturbation=0.0)["loss"]
    torch.testing.assert_close(loss, torch.zeros(6, dtype=loss.dtype), atol=1e-16, rtol=0)


def test_negative_gamma_is_rejected(setup):
    d, x0, noise, t = setup
    model = ReturnsNoise(d, x0, noise, perturbed=False)
    with pytest.raises(ValueError, match="input_perturbation must be >= 0"):
        d.training_losses(model, x0, t, noise=noise, input_perturbation=-0.1)


class ReturnsZero(nn.Module):
    num_classes = 0

    def forward(self, x_t, t, y):
        return torch.zeros_like(x_t)


def test_min_snr_weights_each_sample_by_min_snr_g_over_snr(setup):
    d, x0, noise, t = setup
    plain = d.training_losses(ReturnsZero(), x0, t, noise=noise)["loss"]
    weighted = d.training_losses(ReturnsZero(), x0, t, noise=noise, min_snr_gamma=5.0)["loss"]
    ab = torch.from_numpy(d.alphas_cumprod)[t]
    snr = ab / (1 - ab)
    torch.testing.assert_close(weighted, plain * torch.clamp(5.0 / snr, max=1.0).float())
    # Only the nearly clean timesteps (SNR > 5: t = 0, 10, 100 here) are weighted down.
    assert (weighted[:3] < plain[:3]).all() and torch.equal(weighted[3:], plain[3:])


def test_min_snr_gamma_flows_from_the_config_into_the_denoiser_loss():
    from training.config import DiffusionConfig
    from training.losses import denoiser_losses

    cfg = DiffusionConfig(num_timesteps=100, p_uncond=0.0, min_snr_gamma=1.0)
    plain_cfg = cfg.model_copy(update={"min_snr_gamma": 0.0})
    d = cfg.build()
    z0, y = torch.randn(256, 2, 4, 4), torch.zeros(256, dtype=torch.long)
    torch.manual_seed(0)
    weighted = denoiser_losses(ReturnsZero(), d, z0, y, cfg, num_classes=10)["loss"]
    torch.manual_seed(0)
    plain = denoiser_losses(ReturnsZero(), d, z0, y, plain_cfg, num_classes=10)["loss"]
    assert weighted < 0.9 * plain


def test_negative_min_snr_gamma_is_rejected(setup):
    d, x0, noise, t = setup
    with pytest.raises(ValueError, match="min_snr_gamma must be >= 0"):
        d.training_losses(ReturnsZero(), x0, t, noise=noise, min_snr_gamma=-1.0)
