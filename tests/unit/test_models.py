"""Shapes and behaviour of the networks, EMA, and a tiny denoiser overfitting one batch."""

import numpy as np
import torch
from torch import nn

from training.config import StageConfig
from training.diffusion import GaussianDiffusion, get_named_beta_schedule
from training.models import (
    EMA,
    Autoencoder,
    AutoencoderConfig,
    ClassifierConfig,
    NoisyLatentClassifier,
    UNet,
    UNetConfig,
    encode_batch,
)
from training.optimisation import make_optimisation


def test_autoencoder_maps_pixels_to_quarter_resolution_latents():
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(image_channels=3, base_channels=8, scale_factor=0.5))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, logvar = ae.encode(x)
    assert mean.shape == logvar.shape == (2, 4, 8, 8)
    assert ae.decode(mean).shape == (2, 3, 32, 32)
    torch.testing.assert_close(ae.encode_latents(x), 0.5 * mean)
    pixels = ae.decode_latents(torch.randn(2, 4, 8, 8) * 100)
    assert pixels.min() >= -1 and pixels.max() <= 1
    cached = encode_batch(ae, x)  # the latent cache's pass: float32 on the host, exactly
    assert cached.dtype == np.float32 and cached.shape == (2, 4, 8, 8)
    np.testing.assert_array_equal(cached, ae.encode_latents(x).detach().numpy())


def test_unet_predicts_noise_shaped_output_and_uses_the_null_label():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(model_channels=16, channel_mult=(1, 2), num_classes=5, num_heads=2))
    nn.init.normal_(unet.conv_out.weight, std=0.1)
    z, t = torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999])
    out = unet(z, t, torch.tensor([0, 1, 4]))
    assert out.shape == z.shape
    torch.testing.assert_close(unet(z, t, None), unet(z, t, torch.full((3,), 5)))
    assert not torch.allclose(unet(z, t, None), out)
    assert any(
        isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__
        for m in unet.modules()
    )
    no_attention = UNet(UNetConfig(model_channels=16, attention=False, num_classes=5))
    assert not any("Attention" in type(m).__name__ for m in no_attention.modules())


def test_classifier_returns_logits_per_class():
    clf = NoisyLatentClassifier(ClassifierConfig(model_channels=8, num_classes=7))
    assert clf(torch.randn(5, 4, 8, 8), torch.arange(5)).shape == (5, 7)


def test_ema_tracks_the_moving_average():
    model = nn.Linear(3, 1)
    ema = EMA(model, decay=0.9)
    start = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, 0.9 * start + 0.1 * model.weight)
    assert not ema.model.weight.requires_grad


def test_tiny_denoiser_overfits_one_batch():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(get_named_beta_schedule("linear", 100))
    unet = UNet(
        UNetConfig(
            model_channels=16, channel_mult=(1, 2), num_res_blocks=1, num_classes=2, num_heads=2
        )
    )
    z0, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 0, 1])
    t, noise = torch.tensor([10, 30, 60, 90]), torch.randn(4, 4, 8, 8)
    optimisation = make_optimisation(unet, StageConfig(steps=1, batch_size=4, learning_rate=3e-3))

    def loss() -> torch.Tensor:
        return diffusion.training_losses(unet, z0, t, y, noise=noise)["loss"].mean()

    first = float(loss().detach())
    for _ in range(150):
        optimisation.step(loss(), unet)
    assert first > 0.9  # the zero-initialised output predicts 0 for unit-variance noise
    assert float(loss().detach()) < 0.05 * first
