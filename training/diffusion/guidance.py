"""Guidance: classifier-free (Ho & Salimans 2022) and classifier (Dhariwal & Nichol 2021).

Both act on the predicted noise ε̂ of every latent channel; nothing here picks
channels. The denoiser is called as ``model(x_t, t, y)`` and exposes
``num_classes``; the id ``num_classes`` is the learned null label.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GuidanceScale = float | Tensor
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str) -> Tensor:
    """Standard normal noise [*shape]; with one generator per sample, row i draws from
    generator i only, so a sample is reproducible whatever it is batched with."""
    if generator is None or isinstance(generator, torch.Generator):
        device_of_gen = generator.device if generator is not None else device
        return torch.randn(tuple(shape), generator=generator, device=device_of_gen).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generator]
    return torch.stack(rows).to(device)


def _per_sample(scale: GuidanceScale, like: Tensor) -> Tensor:
    """A float or a [B] tensor of scales, shaped [B, 1, …, 1] for broadcasting."""
    scale = torch.as_tensor(scale, dtype=like.dtype, device=like.device)
    return scale.reshape(-1, *([1] * (like.dim() - 1)))


def _rows_using(scale: GuidanceScale, batch: int) -> Tensor | None:
    """Indices of the rows whose scale is non-zero, or None when every row uses it."""
    scale = torch.as_tensor(scale)
    if scale.dim() == 0:
        return None if bool(scale != 0) else torch.zeros(0, dtype=torch.long)
    rows = torch.nonzero(scale != 0).flatten()
    return None if len(rows) == batch else rows


def classifier_free_eps(
    model: nn.Module, x_t: Tensor, t: Tensor, y: Tensor | None, guidance_scale: GuidanceScale
) -> Tensor:
    """ε̃ = (1 + w)·ε_θ(x_t, t, y) − w·ε_θ(x_t, t, ∅).

    The conditional pass of every row and the null pass of the rows with w ≠ 0 go
    through the network as one batch (of 2B when every row is guided), so a row with
    w = 0 costs one pass. With ``y`` None the unconditional prediction is returned.
    """
    if y is None:
        return model(x_t, t, None).float()
    guided = _rows_using(guidance_scale, len(x_t))
    if guided is not None and len(guided) == 0:
        return model(x_t, t, y).float()
    index = slice(None) if guided is None else guided.to(x_t.device)
    null = torch.full_like(y[index], model.num_classes)
    # float32 from here on, also when the network ran under bf16/fp16 autocast.
    both = model(torch.cat([x_t, x_t[index]]), torch.cat([t, t[index]]), torch.cat([y, null]))
    both = both.float()
    cond, uncond = both[: len(x_t)], both[len(x_t) :]
    w = _per_sample(guidance_scale, cond)[index]
    eps = cond.clone()
    eps[index] = (1 + w) * cond[index] - w * uncond
    return eps


def classifier_log_prob_grad(classifier: nn.Module, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """∇_{x_t} log p_φ(y | x_t, t) for each sample, shaped like x_t."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x, t).float(), dim=-1)
        selected = log_probs[torch.arange(len(y), device=y.device), y]
        return torch.autograd.grad(selected.sum(), x)[0]


def guided_eps(
    model: nn.Module,
    x_t: Tensor,
    t: Tensor,
    y: Tensor | None,
    guidance_scale: GuidanceScale,
    classifier: nn.Module | None,
    classifier_scale: GuidanceScale,
    sqrt_one_minus_alpha_bar: Tensor,
) -> Tensor:
    """ε̂ with classifier-free guidance, then ε̃ = ε̂ − s·√(1−ᾱ_t)·∇ log p_φ(y | x_t, t).

    ``t`` holds the timesteps the networks were trained on; ``sqrt_one_minus_alpha_bar``
    is √(1−ᾱ_t) shaped [B, 1, …, 1]. The classifier's gradient is computed for the
    rows with s ≠ 0 only.
    """
    eps = classifier_free_eps(model, x_t, t, y, guidance_scale)
    if classifier is None or y is None:
        return eps
    guided = _rows_using(classifier_scale, len(x_t))
    if guided is not None and len(guided) == 0:
        return eps
    index = slice(None) if guided is None else guided.to(x_t.device)
    s = _per_sample(classifier_scale, eps)[index]
    grad = classifier_log_prob_grad(classifier, x_t[index], t[index], y[index])
    eps[index] = eps[index] - s * sqrt_one_minus_alpha_bar[index] * grad.to(eps.dtype)
    return eps


def drop_labels(
    y: Tensor, null_id: int, p_uncond: float, generator: torch.Generator | None = None
) -> Tensor:
    """Replace each label by ``null_id`` with probability ``p_uncond`` (CFG training)."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null_id), y)
