"""How a stage's parameters move: AdamW with warm-up and clipping, and the guard
that stops a stage whose loss is no longer finite. Used alike by the in-process
trainer and the Ray Train worker loop."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
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
    """AdamW (fused), a linear warm-up to the stage's learning rate, then constant or a
    cosine decay, and gradient clipping."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_clip: float

    def update(self, loss: Tensor, model: nn.Module) -> Tensor:
        """Backpropagate ``loss``, clip, update the parameters; returns the pre-clip
        gradient norm as a 0-d tensor, so that a GPU loop only waits for it on the steps
        that log it. Nothing here waits for the device, so a CUDA graph can hold it."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        self.optimizer.step()
        return grad_norm.detach()

    def step(self, loss: Tensor, model: nn.Module) -> Tensor:
        """:meth:`update`, then the learning rate moves on one step."""
        grad_norm = self.update(loss, model)
        self.scheduler.step()
        return grad_norm

    def load_state_dict(self, optimizer: dict, scheduler: dict) -> None:
        """Continue from a checkpoint's optimiser and schedule state."""
        rates = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(optimizer)
        for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
            if isinstance(rate, Tensor):  # keep the rate where a CUDA graph reads it
                group["lr"] = rate.fill_(float(group["lr"]))
        self.scheduler.load_state_dict(scheduler)

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def make_optimisation(
    model: nn.Module, stage: StageConfig, graph_device: torch.device | None = None
) -> Optimisation:
    """``graph_device``: the CUDA device of a step that runs as a CUDA graph. The rate
    then lives in a tensor there that the schedule fills before each replay, and
    AdamW is capturable (its step count stays on the device too)."""
    params = list(model.parameters())
    # fused: one kernel for the whole update (4× faster than foreach on the demo's CPU)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    rate: float | Tensor = stage.learning_rate
    if graph_device is not None:
        rate = torch.tensor(stage.learning_rate, dtype=torch.float32, device=graph_device)
    optimizer = torch.optim.AdamW(
        params,
        lr=rate,
        weight_decay=stage.weight_decay,
        fused=fused,
        capturable=graph_device is not None,
    )
    for group in optimizer.param_groups:  # the schedule scales a number, never a tensor
        group["initial_lr"] = stage.learning_rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(stage, step))
    return Optimisation(optimizer, scheduler, stage.grad_clip)


def lr_factor(stage: StageConfig, step: int) -> float:
    """The fraction of the stage's learning rate that step ``step`` (from 0) uses: a
    linear warm-up, then constant or a half cosine that reaches zero after the last step."""
    warmup = max(stage.warmup_steps, 1)
    if step < warmup:
        return (step + 1) / warmup
    if stage.lr_decay == "constant" or stage.steps <= warmup:
        return 1.0
    progress = min(1.0, (step + 1 - warmup) / (stage.steps - warmup + 1))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products natively (x86 AVX512-BF16 or AMX)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def configure_device(device: torch.device | str) -> None:
    """How this process's training kernels run on ``device``. On a GPU: cuDNN times its
    algorithms for each new shape once and keeps the fastest (a stage's step repeats
    the same shapes), and float32 matrix products and convolutions may use TF32
    (convolutions do by PyTorch's default already). ``benchmarks/gpu_check.py``
    measures the step under the same settings. Nothing changes on the CPU."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True


def autocast_dtype(training: StageConfig, device: torch.device | str) -> torch.dtype | None:
    """The dtype a stage's forward passes autocast to on ``device``; None for fp32."""
    kind = torch.device(device).type
    if training.precision == "fp32" or kind not in ("cuda", "cpu"):
        return None
    if kind == "cuda":
        return torch.bfloat16
    if training.precision == "bf16" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(
    training: StageConfig, device: torch.device | str, cache: bool = True
) -> AbstractContextManager:
    """The context a stage's forward pass and loss run in: matmuls and convolutions in
    bf16 where :func:`autocast_dtype` says so (losses stay fp32), else plain fp32.
    ``cache=False`` recasts the weights at every use, as a CUDA graph needs."""
    dtype = autocast_dtype(training, device)
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype, cache_enabled=cache)


def memory_format(training: StageConfig) -> torch.memory_format:
    """The memory format a stage trains its network and batches in."""
    return torch.channels_last if training.channels_last else torch.contiguous_format


def compiled(net: nn.Module, training: StageConfig) -> nn.Module:
    """What a stage's steps call: ``net`` through ``torch.compile`` when the stage asks
    for it, else ``net`` itself. The compiled module shares ``net``'s parameters, so the
    optimiser, the EMA and checkpoints keep working on ``net``."""
    return torch.compile(net) if training.compile else net


def to_device(
    x: Tensor, device: torch.device | str, training: StageConfig, non_blocking: bool = False
) -> Tensor:
    """A batch on ``device``, in the stage's memory format when it is 4-D (images)."""
    if x.dim() == 4:
        return x.to(device, memory_format=memory_format(training), non_blocking=non_blocking)
    return x.to(device, non_blocking=non_blocking)


def batches_on_device(
    batches: Iterable[tuple[Tensor, Tensor]], device: torch.device, training: StageConfig
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x, y)`` batches moved to ``device``. On a GPU each batch is pinned and copied
    without making the host wait: a copy from pageable memory blocks the host until
    the GPU has finished the previous step, so the next step's kernels could not be
    queued while it ran."""
    gpu = device.type == "cuda"
    for x, y in batches:
        if gpu:
            x, y = x.pin_memory(), y.pin_memory()
        yield to_device(x, device, training, gpu), y.to(device, non_blocking=gpu)
