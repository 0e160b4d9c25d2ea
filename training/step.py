"""One optimisation step of a stage, as the in-process trainer and the Ray Train worker
loop call it, and the same step captured once as a CUDA graph and replayed.

A UNet step launches thousands of small kernels (norms, activations, the optimiser).
On a GPU whose host cannot queue them as fast as they run, the GPU waits: the `base`
denoiser's step at its batch of 128 kept an H200 busy 19% of the time eagerly
(benchmarks/RESULTS.md). Replaying a captured graph is one launch per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from training.config import StageConfig
from training.models import EMA
from training.optimisation import Optimisation, autocast

Losses = Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]
GRAPH_WARMUP_STEPS = 3  # eager steps before the capture: cuDNN's choices, AdamW's state


def uses_cuda_graph(training: StageConfig, device: torch.device, world: int) -> bool:
    """Whether a stage's steps run as a CUDA graph: asked for, on a CUDA device, and in a
    single process (a DDP step's gradient all-reduce is not captured)."""
    return training.cuda_graph and device.type == "cuda" and world == 1


class StageStep:
    """``losses, grad_norm = step(x, y)``: the stage's losses under autocast, backward,
    clipping, the AdamW update, the EMA, then the learning rate moves on.

    With ``graph`` (see :func:`uses_cuda_graph`; the optimisation must come from
    ``make_optimisation(..., graph_device=device)``), the first
    :data:`GRAPH_WARMUP_STEPS` steps run eagerly on a side stream, the next is captured
    and every later one copies its batch into the graph's inputs and replays it. Every
    call is a real step on its own batch, with fresh noise, timesteps and dropout (the
    graph advances the CUDA generator at each replay). The returned tensors are the
    graph's: read them before the next call. A batch of another shape (a short last
    batch) runs eagerly.
    """

    def __init__(
        self,
        losses: Losses,
        model: nn.Module,
        optimisation: Optimisation,
        ema: EMA | None,
        training: StageConfig,
        device: torch.device,
        graph: bool = False,
    ):
        self.losses, self.model, self.optimisation = losses, model, optimisation
        self.ema, self.training, self.device, self.graph = ema, training, device, graph
        self._eager_steps = 0
        self._captured: torch.cuda.CUDAGraph | None = None
        self._inputs: tuple[Tensor, Tensor] | None = None
        self._outputs: tuple[dict[str, Tensor], Tensor] | None = None

    def __call__(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        out = self._graphed(x, y) if self.graph else self._step(x, y)
        self.optimisation.scheduler.step()
        return out

    def _step(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        self.model.train()
        with autocast(self.training, self.device, cache=not self.graph):
            losses = self.losses(self.model, x, y)
        grad_norm = self.optimisation.update(losses["loss"], self.model)
        if self.ema is not None:
            self.ema.update(self.model)
        return losses, grad_norm

    def _graphed(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        if self._captured is None and self._eager_steps < GRAPH_WARMUP_STEPS:
            self._eager_steps += 1
            return self._on_side_stream(x, y)
        if self._captured is None:
            self._inputs = (x.clone(), y.clone())  # clone keeps the memory format
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the step; nothing runs yet
                self._outputs = self._step(*self._inputs)
            self._captured = graph
        static_x, static_y = self._inputs
        if x.shape != static_x.shape or y.shape != static_y.shape:
            return self._on_side_stream(x, y)
        static_x.copy_(x, non_blocking=True)
        static_y.copy_(y, non_blocking=True)
        self._captured.replay()
        return self._outputs

    def _on_side_stream(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """An eager step on a side stream, as CUDA graph capture asks of the steps
        around it (its memory stays out of the default stream's pool)."""
        main, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = self._step(x, y)
        main.wait_stream(side)
        return out
