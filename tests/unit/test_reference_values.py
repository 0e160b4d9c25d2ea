"""Stored reference values: named schedules never change once committed, one sampling
step of a fixed tiny network gives the same numbers, and a seeded in-process training
run ends at the same weights. A refactor that changes any of them changes results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.config import LDMConfig
from training.diffusion import GaussianDiffusion, get_named_beta_schedule
from training.local import train_in_process
from training.models import UNet, UNetConfig
from training.presets import get_preset

# ᾱ_t at t = 0, 99, 499, 999 of the 1,000-step schedules.
ALPHAS_CUMPROD = {
    "linear": [0.9999, 0.8970181457, 0.07858724288, 4.035829765e-05],
    "cosine": [0.9999587158, 0.9720927371, 0.4938435904, 2.428766907e-09],
}


@pytest.mark.parametrize("name", sorted(ALPHAS_CUMPROD))
def test_named_schedules_never_change(name):
    alphas_cumprod = np.cumprod(1 - get_named_beta_schedule(name, 1000))
    kept = alphas_cumprod[[0, 99, 499, 999]]
    np.testing.assert_allclose(kept, ALPHAS_CUMPROD[name], rtol=1e-8)


@pytest.fixture(scope="module")
def fixed_step():
    """A tiny UNet with seeded weights (none zero), x_t, noise, t and y."""
    torch.manual_seed(0)
    config = UNetConfig(
        in_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, num_classes=3
    )
    net = UNet(config).eval()
    weights = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=weights))
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    diffusion = GaussianDiffusion(get_named_beta_schedule("linear", 100))
    return net, diffusion, x, noise, torch.tensor([50, 7]), torch.tensor([0, 2])


def _first(values: torch.Tensor) -> list[float]:
    return values.flatten()[:4].tolist()


@torch.no_grad()
def test_one_sampling_step_of_a_fixed_network(fixed_step):
    net, diffusion, x, noise, t, y = fixed_step
    eps = net(x, t, y)
    assert _first(eps) == pytest.approx([-0.020115, -0.001617, 0.000455, -0.015228], abs=2e-6)
    ddpm = diffusion.ddpm_step(x, t, eps, noise)
    assert _first(ddpm) == pytest.approx([-1.442554, -0.366262, -0.765746, -1.717843], abs=2e-6)
    ddim = diffusion.ddim_step(x, t, eps, 0.0, None)
    assert _first(ddim) == pytest.approx([-1.608319, -0.791384, -0.689959, -1.697098], abs=2e-6)


def test_a_guided_respaced_chain_of_a_fixed_network(fixed_step):
    net, diffusion, _, _, _, y = fixed_step
    samples = diffusion.sample(
        net,
        (2, 4, 8, 8),
        y=y,
        guidance_scale=2.0,
        sampler="ddim",
        steps=5,
        generator=torch.Generator().manual_seed(3),
    )
    expected = [-14.327025, 79.980011, -169.470932, 20.161963]
    assert _first(samples) == pytest.approx(expected, rel=1e-5)


def test_a_seeded_in_process_run_ends_at_the_same_weights():
    """Three steps of each stage on fixed images: the stage order, the latent scale and
    the random draws of every stage are those of the committed trainer. CPU kernels
    differ between instruction sets: the same run moved the classifier's sum by 4e-4
    (relative) from one x86 machine to another, so the values hold to 1e-3."""
    data = get_preset("tiny").model_dump()
    for stage in ("autoencoder", "denoiser", "classifier"):
        data[f"{stage}_training"]["steps"] = 3
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32), dtype=np.uint8)
    model = train_in_process(
        LDMConfig.model_validate(data),
        images,
        np.arange(64) % 10,
        progress=False,
        log=lambda line: None,
    )
    assert model.config.autoencoder.scale_factor == pytest.approx(2.8492573153399037, rel=1e-3)
    sums = {
        part: float(sum(p.double().sum() for p in getattr(model, part).parameters()))
        for part in ("autoencoder", "denoiser", "classifier")
    }
    expected = {
        "autoencoder": 192.27844733727,
        "denoiser": 619.48371468638,
        # 55.8417 until one-channel pixels got plain NCHW strides (the convolutions
        # had taken the channels-last path on them, another summation order)
        "classifier": 56.599909878700,
    }
    assert sums == pytest.approx(expected, rel=1e-3)
