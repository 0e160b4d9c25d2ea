"""Exponential moving average of a model's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps θ_ema ← decay·θ_ema + (1 − decay)·θ after every optimiser step.

    The shadow is a frozen copy of the unwrapped model (``.module`` of a DDP
    wrapper), so it can be saved, loaded and sampled from like the original.
    Buffers (e.g. norm statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        source = _unwrap(model)
        shadows, params = list(self.model.parameters()), list(source.parameters())
        if len(shadows) != len(params):
            raise ValueError(f"EMA holds {len(shadows)} parameters, the model {len(params)}")
        # One fused kernel per dtype/device group instead of one per parameter.
        torch._foreach_lerp_(shadows, [p.detach() for p in params], 1.0 - self.decay)
        for shadow, buf in zip(self.model.buffers(), source.buffers(), strict=True):
            shadow.copy_(buf)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model
