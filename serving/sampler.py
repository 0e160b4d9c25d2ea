"""Work and results of the sampling engine, and how reproducible an image is.

A validated request becomes a :class:`SampleJob`; :mod:`serving.scheduler` samples its
images, one row each, in forwards shared with whatever else is running, and answers
with a :class:`SampleResult` (or a :class:`SampleFailure`).

Determinism: image i of a request draws all its noise from its own
``torch.Generator().manual_seed(seed + i)`` (CPU generators, so the noise is the
same on every device), so the noise never depends on the rest of the batch. The
network's arithmetic may: CPU kernels can sum in a different order for a different
batch size, which moves pixels by ~1e-6 to 1e-4 before rounding. After conversion
to uint8 a request batched with others therefore matches the same request alone up
to a rare ±1 level (measured on CPU, 16 two-image requests, DDPM 20 steps: the tiny
preset differed by 1 level on 0.05% of the pixels, the demo preset not at all). The
tests allow ±2 levels on at most 1% of the pixels, alone, in a mix and joining a
running batch mid-chain.

A GPU moves more: its kernels are chosen per batch width, and with cuDNN's default
TF32 convolutions, and its non-deterministic algorithms, an fp32 image in a mix
differed from the same request alone by 1 level on 1.28% of the pixels (H200,
``benchmarks/RESULTS.md``). A GPU engine therefore runs deterministic kernels in full
float32 (``deterministic``, the default; see :func:`serving.engine.configure_torch`).
With ``batch_invariant`` every network call runs at one width, so nothing depends on
the batch: an image is bit-identical alone, in a mix and joining mid-chain, on any
device (tested with a network whose output moves with its batch width).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from training.names import SamplerName


@dataclass(frozen=True)
class SampleJob:
    """One validated request: class ids (one per image) and how to sample them."""

    labels: tuple[int, ...]
    guidance_scale: float
    classifier_scale: float
    sampler: SamplerName
    steps: int
    eta: float  # DDIM only; 0 for the other samplers, where it has no effect
    seed: int
    eps_scaling: float = 1.0  # ε̂ / (b + k·t/T), training.diffusion.exposure; 1 and 0: off
    eps_scaling_slope: float = 0.0


@dataclass(frozen=True)
class RequestReport:
    """How a request was sampled, returned with its images."""

    forwards: int  # network forwards its images took part in
    mean_rows_per_forward: float  # images per forward (all requests), over those forwards
    max_rows_per_forward: int
    max_requests_per_forward: int  # the most requests that shared one of its forwards
    queued_s: float  # from arrival to its first row's admission
    sampling_s: float  # from then to its answer


@dataclass(frozen=True)
class SampleResult:
    images: np.ndarray  # uint8 [N, H, W, C], N = len(job.labels)
    report: RequestReport


@dataclass(frozen=True)
class SampleFailure:
    """The job failed on the server; other requests are unaffected."""

    message: str
    # The replica cannot sample at all now (its engine stopped) and is being replaced:
    # the request may be sent again, unlike one whose own sampling failed.
    retryable: bool = False


def image_generator(seed: int, image: int) -> torch.Generator:
    """The CPU generator of image ``image`` of a request with ``seed``: seeded seed + image."""
    return torch.Generator().manual_seed(seed + image)


def generators_for(seed: int, count: int) -> list[torch.Generator]:
    """One generator per image of a request, as :func:`image_generator` gives them."""
    return [image_generator(seed, i) for i in range(count)]
