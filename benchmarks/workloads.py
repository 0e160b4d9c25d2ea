"""The serving benchmarks' workloads, shared by ``bench_serve.py`` (over HTTP) and
``gpu_serve_check.py`` (the engine on a GPU), so both send the same requests."""

from __future__ import annotations

import random

# The uniform workload's settings; the mixed one's, each drawn per request with equal odds.
UNIFORM = {"guidance_scale": 3.0, "sampler": "ddim", "steps": 20}
MIXED_STEPS = (10, 20, 50)
MIXED_SAMPLERS = ("ddim", "dpmpp_2m", "ddpm")
MIXED_GUIDANCE = (0.0, 1.0, 3.0)
SHORT_STEPS = min(MIXED_STEPS)  # the short load's, and the mixed load's short requests'


WORKLOADS = ("uniform", "mixed", "short")


def request_settings(workload: str, client: int, index: int) -> dict:
    """Steps, sampler and guidance of request ``index`` of ``client``: the same in
    every mode and every run. ``short`` is the mixed load's draw with every request cut
    to its fewest steps: the short requests alone, at the same concurrency, to set their
    latency in the mixed load against."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}: choose one of {', '.join(WORKLOADS)}")
    if workload == "uniform":
        return dict(UNIFORM)
    draw = random.Random(client * 100_003 + index)
    settings = {
        "steps": draw.choice(MIXED_STEPS),
        "sampler": draw.choice(MIXED_SAMPLERS),
        "guidance_scale": draw.choice(MIXED_GUIDANCE),
    }
    if workload == "short":
        settings["steps"] = SHORT_STEPS
    return settings
