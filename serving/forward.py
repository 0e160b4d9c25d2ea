"""How the sampling engine calls a network when its batch width must not matter.

:class:`LatentDecoder` is the autoencoder's decoding of scaled latents as a module of
its own, so that the same wrappers serve the denoiser and the decoder.
:class:`FixedWidth` runs a network on exactly ``width`` rows at a time, padding the
last chunk, so no kernel ever sees another batch size: the basis of the scheduler's
``batch_invariant`` mode. :class:`CudaGraphed` records a network's forward at one
input shape as a CUDA graph and replays it, one launch per forward instead of one per
kernel; behind :class:`FixedWidth` there is only one shape, so one graph per model
version serves every step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

GRAPH_WARMUP_CALLS = 3  # eager calls on a side stream before the capture (cuDNN's choices)


class LatentDecoder(nn.Module):
    """``autoencoder.decode_latents``: scaled latents [B, c, h, w] → pixels in [-1, 1]."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, z0: Tensor) -> Tensor:
        return self.autoencoder.decode_latents(z0)


class FixedWidth(nn.Module):
    """``net`` called on exactly ``width`` rows at a time: a call of n rows runs as
    ⌈n / width⌉ calls, the last one padded with copies of its last row, and returns the
    n real rows. Every argument is a tensor with the rows first, or None. Rows never
    mix inside ``net`` (convolutions, normalisation and attention are per image), so
    the padding changes no real row; gradients reach only the real rows."""

    def __init__(self, net: nn.Module, width: int):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.net, self.width = net, width
        self.num_classes = getattr(net, "num_classes", None)  # guidance reads it

    def forward(self, *args: Tensor | None) -> Tensor:
        rows = len(next(a for a in args if a is not None))
        outs = []
        for start in range(0, rows, self.width):
            real = min(self.width, rows - start)
            chunk = [None if a is None else _pad(a[start : start + real], self.width) for a in args]
            outs.append(self.net(*chunk)[:real])
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _pad(x: Tensor, rows: int) -> Tensor:
    """``x`` with its last row repeated up to ``rows`` rows."""
    missing = rows - len(x)
    return x if missing == 0 else torch.cat([x, x[-1:].expand(missing, *x.shape[1:])])


Signature = tuple[tuple[tuple[int, ...], torch.dtype] | None, ...]


def _signature(args: tuple[Tensor | None, ...]) -> Signature:
    return tuple(None if a is None else (tuple(a.shape), a.dtype) for a in args)


class CudaGraphed(nn.Module):
    """``net``'s inference forward on a CUDA device, recorded as a CUDA graph.

    The first call with a given input signature (shapes, dtypes, which arguments are
    None) runs :data:`GRAPH_WARMUP_CALLS` eager calls on a side stream, then records
    one; every call copies its inputs into the graph's, replays it and returns a copy
    of the graph's output. Call it under ``torch.no_grad()`` (the graph holds no
    autograd state) and, under autocast, with ``cache_enabled=False``. A new signature
    is recorded anew, replacing the old graph.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_classes = getattr(net, "num_classes", None)
        self.captures = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._signature: Signature = ()
        self._inputs: tuple[Tensor | None, ...] = ()
        self._output: Tensor | None = None

    def forward(self, *args: Tensor | None) -> Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("CudaGraphed records inference only: call it under no_grad")
        if self._graph is None or _signature(args) != self._signature:
            self._capture(args)
        for static, arg in zip(self._inputs, args, strict=True):
            if static is not None and arg is not None:
                static.copy_(arg, non_blocking=True)
        assert self._graph is not None and self._output is not None
        self._graph.replay()
        return self._output.clone()

    def _capture(self, args: tuple[Tensor | None, ...]) -> None:
        self._graph = self._output = None  # free the old graph's pool first
        self._inputs = tuple(None if a is None else a.clone() for a in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_CALLS):
                self.net(*self._inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the forward; nothing runs yet
            self._output = self.net(*self._inputs)
        self._graph, self._signature = graph, _signature(args)
        self.captures += 1
