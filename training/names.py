"""The closed sets of names the pipeline uses, as types: model presets, samplers, the
stages, the metric promotion compares; and the few defaults every command shares.
Configs, the HTTP schema and the command line (``typing.get_args``) all take them from
here. Imports nothing but ``typing``, so the command line can build its options without
loading torch."""

from __future__ import annotations

from typing import Literal

PresetName = Literal["tiny", "demo", "base"]
# dpmpp_2m: DPM-Solver++(2M), deterministic, good images in 10–20 steps.
SamplerName = Literal["ddpm", "ddim", "dpmpp_2m"]
StageName = Literal["autoencoder", "denoiser", "classifier"]
# Fréchet distance (lower is better) or class consistency (higher is better).
PromotionMetric = Literal["fd", "class_consistency"]

# CPUs (and torch threads) a training worker reserves unless told otherwise, by
# `ldm train`, `ldm retrain` and a retrain config alike: both cores of a laptop.
DEFAULT_CPUS_PER_WORKER = 2.0
# CPUs of each node of the `ldm up` stack: enough for a worker of the default above.
STACK_NODE_CPUS = int(DEFAULT_CPUS_PER_WORKER)
