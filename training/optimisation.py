"""How a stage's parameters move: AdamW with warm-up and clipping, and the guard
that stops a stage whose loss is no longer finite. Used alike by the in-process
trainer and the Ray Train worker loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from training.config import StageConfig


class NonFiniteLoss(RuntimeError):
    """A stage's loss became inf or NaN: the stage stops, nothing is registered."""

    def __init__(self, stage: str, step: int):
        super().__init__(
            f"the {stage} stage's loss is not finite (inf or NaN) at step {step}; training "
            f"stopped and nothing was registered: lower {stage}_training.learning_rate, "
            "check the data for damaged samples, or resume from an earlier checkpoint"
        )
        self.stage, self.step = stage, step


class FiniteLossGuard:
    """Remembers the first step whose loss was not finite. :meth:`observe` stays on
    the device (a GPU loop does not wait for it); :meth:`first_bad_step` reads it."""

    NONE = 2**62

    def __init__(self, device: torch.device):
        self._first = torch.full((), self.NONE, dtype=torch.int64, device=device)

    def observe(self, loss: Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()) & (self._first == self.NONE)
        self._first = torch.where(bad, step, self._first)

    def first_bad_step(self, distributed: bool = False) -> int | None:
        """The first non-finite step so far (over all ranks when ``distributed``: every
        rank must call this at the same steps); None when every loss was finite."""
        first = self._first.clone()
        if distributed:
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        value = int(first)
        return None if value == self.NONE else value


@dataclass
class Optimisation:
    """AdamW, a linear warm-up to the stage's learning rate, and gradient clipping."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_clip: float

    def step(self, loss: Tensor, model: nn.Module) -> Tensor:
        """Backpropagate ``loss``, clip, update; returns the pre-clip gradient norm as a
        0-d tensor, so that a GPU loop only waits for it on the steps that log it."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return grad_norm.detach()

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def make_optimisation(model: nn.Module, stage: StageConfig) -> Optimisation:
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=stage.learning_rate, weight_decay=stage.weight_decay
    )
    warmup = max(stage.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup)
    )
    return Optimisation(optimizer, scheduler, stage.grad_clip)


def memory_format(training: StageConfig) -> torch.memory_format:
    """The memory format a stage trains its network and batches in."""
    return torch.channels_last if training.channels_last else torch.preserve_format


def to_device(x: Tensor, device: torch.device | str, training: StageConfig) -> Tensor:
    """A batch on ``device``, in the stage's memory format when it is 4-D (images)."""
    if x.dim() == 4:
        return x.to(device, memory_format=memory_format(training))
    return x.to(device)
