"""Samplers and guidance with small deterministic stand-in networks and the real UNet."""

import pytest
import torch
from torch import nn

from training.diffusion import (
    GaussianDiffusion,
    classifier_free_eps,
    get_named_beta_schedule,
    guided_eps,
)
from training.models import ClassifierConfig, NoisyLatentClassifier, UNet, UNetConfig

SHAPE = (4, 4, 8, 8)


class LabelShift(nn.Module):
    """ε(x, t, y) = 0.1·x + (y+1)/10 on every channel, different for each label."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x, t, y):
        self.calls.append(x.shape[0])
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes)
        return 0.1 * x + (y.to(x.dtype) + 1).reshape(-1, 1, 1, 1) / 10


class ChannelWeights(nn.Module):
    """logits_k = Σ_{c,h,w} x·k/(c+1): a classifier whose gradient reaches every channel."""

    def forward(self, x, t):
        weights = 1.0 / torch.arange(1, x.shape[1] + 1, dtype=x.dtype).reshape(1, -1, 1, 1)
        s = (x * weights).sum(dim=(1, 2, 3))
        return torch.stack([s * k for k in range(3)], dim=1)


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(get_named_beta_schedule("linear", 100))


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(SHAPE, generator=g), torch.full((4,), 50), torch.tensor([0, 1, 2, 1])


def test_guidance_scale_zero_is_the_conditional_prediction(inputs):
    x, t, y = inputs
    model = LabelShift()
    torch.testing.assert_close(classifier_free_eps(model, x, t, y, 0.0), model(x, t, y))


def test_classifier_free_guidance_formula_in_one_forward(inputs):
    x, t, y = inputs
    model, w = LabelShift(), 2.5
    out = classifier_free_eps(model, x, t, y, w)
    assert model.calls == [8]  # conditional and null passes as one batch of 2B
    expected = (1 + w) * model(x, t, y) - w * model(x, t, None)
    torch.testing.assert_close(out, expected)
    # Every channel of every sample moved away from the conditional prediction.
    changed = (out - model(x, t, y)).abs().amax(dim=(2, 3))
    assert (changed > 1e-3).all()


def test_per_sample_guidance_scales(inputs):
    x, t, y = inputs
    model = LabelShift()
    scales = torch.tensor([0.0, 1.0, 2.0, 3.0])
    out = classifier_free_eps(model, x, t, y, scales)
    for i, w in enumerate(scales.tolist()):
        single = classifier_free_eps(model, x[i : i + 1], t[i : i + 1], y[i : i + 1], w)
        torch.testing.assert_close(out[i : i + 1], single)


def test_classifier_guidance_formula_touches_every_channel(inputs, diffusion):
    x, t, y = inputs
    model, classifier, s = LabelShift(), ChannelWeights(), 2.0
    sqrt_1m_ab = torch.full((4, 1, 1, 1), 0.5)
    out = guided_eps(model, x, t, y, 0.0, classifier, s, sqrt_1m_ab)
    # ∇ log softmax(logits)[y] for logits_k = k·S: (y − E_p[k]) · ∂S/∂x
    logits = classifier(x, t)
    expected_k = (logits.softmax(-1) * torch.arange(3.0)).sum(-1)
    weights = 1.0 / torch.arange(1, 5, dtype=x.dtype).reshape(1, -1, 1, 1)
    grad = (y.float() - expected_k).reshape(-1, 1, 1, 1) * weights.expand_as(x)
    torch.testing.assert_close(out, model(x, t, y) - s * 0.5 * grad, rtol=1e-5, atol=1e-6)
    moved = (out - model(x, t, y)).abs().amin(dim=(2, 3))
    nonzero = (y.float() - expected_k).abs() > 1e-3
    assert (moved[nonzero] > 0).all()


def _tiny_unet(num_classes=3):
    torch.manual_seed(0)
    unet = UNet(
        UNetConfig(
            model_channels=8,
            channel_mult=(1, 2),
            num_res_blocks=1,
            num_classes=num_classes,
            num_heads=2,
        )
    )
    for p in unet.conv_out.parameters():  # give the zero-initialised output layer weights
        nn.init.normal_(p, std=0.05)
    return unet.eval()


def test_same_generator_seed_same_samples(diffusion):
    unet, y = _tiny_unet(), torch.tensor([0, 1, 2, 0])
    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.5)):
        a = diffusion.sample(
            unet,
            SHAPE,
            y=y,
            guidance_scale=1.5,
            sampler=sampler,
            eta=eta,
            steps=10,
            generator=torch.Generator().manual_seed(7),
        )
        b = diffusion.sample(
            unet,
            SHAPE,
            y=y,
            guidance_scale=1.5,
            sampler=sampler,
            eta=eta,
            steps=10,
            generator=torch.Generator().manual_seed(7),
        )
        c = diffusion.sample(
            unet,
            SHAPE,
            y=y,
            guidance_scale=1.5,
            sampler=sampler,
            eta=eta,
            steps=10,
            generator=torch.Generator().manual_seed(8),
        )
        assert a.shape == SHAPE and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(a, c)


def test_ddim_eta_zero_is_deterministic_given_x_T(diffusion):
    unet, x_T = _tiny_unet(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    a = diffusion.sample(
        unet,
        SHAPE,
        sampler="ddim",
        eta=0.0,
        steps=20,
        x_T=x_T,
        generator=torch.Generator().manual_seed(1),
    )
    b = diffusion.sample(
        unet,
        SHAPE,
        sampler="ddim",
        eta=0.0,
        steps=20,
        x_T=x_T,
        generator=torch.Generator().manual_seed(99),
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = diffusion.sample(
        unet,
        SHAPE,
        sampler="ddim",
        eta=1.0,
        steps=20,
        x_T=x_T,
        generator=torch.Generator().manual_seed(99),
    )
    assert not torch.allclose(a, c)


def test_per_sample_generators_do_not_depend_on_the_batch(diffusion):
    unet = _tiny_unet()
    y = torch.tensor([0, 1, 2, 0])
    gens = [torch.Generator().manual_seed(100 + i) for i in range(4)]
    batched = diffusion.sample(unet, SHAPE, y=y, guidance_scale=2.0, steps=5, generator=gens)
    single = diffusion.sample(
        unet,
        (1, *SHAPE[1:]),
        y=y[2:3],
        guidance_scale=2.0,
        steps=5,
        generator=[torch.Generator().manual_seed(102)],
    )
    # Equal up to float32 reduction order, which depends on the batch size.
    torch.testing.assert_close(batched[2:3], single, rtol=1e-3, atol=1e-3)
    assert (batched[2:3] - batched[0:1]).abs().mean() > 0.1


def test_classifier_guided_sampling_runs_with_a_real_classifier(diffusion):
    unet = _tiny_unet()
    torch.manual_seed(0)
    clf = NoisyLatentClassifier(ClassifierConfig(model_channels=8, num_classes=3)).eval()
    y = torch.tensor([0, 1, 2, 0])
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    plain = diffusion.sample(unet, SHAPE, y=y, steps=5, generator=g())
    guided = diffusion.sample(
        unet, SHAPE, y=y, steps=5, classifier=clf, classifier_scale=10.0, generator=g()
    )
    assert torch.isfinite(guided).all()
    assert (guided - plain).abs().amax(dim=(0, 2, 3)).min() > 0  # every channel moved


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sampler": "euler"}, "sampler must be one of"),
        ({"eta": 1.5}, r"eta must lie in \[0, 1\]"),
        (
            {"guidance_scale": -1.0, "y": torch.zeros(4, dtype=torch.long)},
            "guidance_scale must be >= 0",
        ),
        ({"guidance_scale": 2.0}, "classifier-free guidance needs class labels"),
        (
            {"classifier_scale": 1.0, "y": torch.zeros(4, dtype=torch.long)},
            "needs both a classifier",
        ),
        ({"steps": 0}, "steps must be between 1 and 100"),
    ],
)
def test_bad_sampling_arguments(diffusion, kwargs, message):
    with pytest.raises(ValueError, match=message):
        diffusion.sample(_tiny_unet(), SHAPE, **kwargs)
