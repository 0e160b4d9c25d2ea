"""Named configurations: ``tiny`` (tests, seconds on a CPU), ``demo`` (a 2-core
laptop learns recognisable 32×32 digits in about four minutes) and ``base`` (a
GPU cluster; see the README for the cluster it expects)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from training.config import DiffusionConfig, LDMConfig, StageConfig
from training.models import AutoencoderConfig, ClassifierConfig, UNetConfig
from training.names import PresetName


def _tiny() -> LDMConfig:
    return LDMConfig(
        preset="tiny",
        autoencoder=AutoencoderConfig(base_channels=8, channel_mult=(1, 2, 2)),
        denoiser=UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1),
        classifier=ClassifierConfig(model_channels=8, channel_mult=(1, 2)),
        # γ = 0.1 (the default): a smoke-test size, kept on the DDPM-IP path it exercises
        diffusion=DiffusionConfig(num_timesteps=100),
        autoencoder_training=StageConfig(steps=20, batch_size=16, learning_rate=2e-3, log_every=5),
        denoiser_training=StageConfig(
            steps=20, batch_size=16, learning_rate=2e-3, ema_decay=0.9, log_every=5
        ),
        classifier_training=StageConfig(steps=20, batch_size=16, learning_rate=2e-3, log_every=5),
    )


def _demo() -> LDMConfig:
    return LDMConfig(
        preset="demo",
        autoencoder=AutoencoderConfig(base_channels=16, channel_mult=(1, 2, 2)),
        # One residual block a level, not two: 0.70× the denoiser's training time and the
        # same quality over 3 seeds (class consistency 0.980 ± 0.007, FD 1.03 ± 0.05
        # against 0.979 ± 0.008, 1.04 ± 0.05; bench_schedule.py, RESULTS.md).
        denoiser=UNetConfig(model_channels=48, channel_mult=(1, 2), num_res_blocks=1),
        classifier=ClassifierConfig(model_channels=32, channel_mult=(1, 2)),
        # γ = 0: at this budget (the ablation ran 1,500 denoiser steps) input perturbation
        # cost quality in every cell of the DDPM-IP ablation (benchmarks/RESULTS.md, 3
        # seeds each: DDIM 10 FD 1.79 ± 0.16 at γ = 0 against 2.35 ± 0.28 at γ = 0.1) and
        # raised the exposure bias it targets (0.17 → 0.26; γ = 0.15 worse again, 0.35);
        # the paper's gain comes after long training.
        # Min-SNR-5 loss weighting: better at every step budget tried; it lets 1,300 steps
        # match or beat 1,500 without it (bench_schedule.py, RESULTS.md, 3 seeds).
        diffusion=DiffusionConfig(num_timesteps=1000, input_perturbation=0.0, min_snr_gamma=5.0),
        # bf16 autocast (where the CPU has native bf16; fp32 elsewhere): 1.87× the
        # autoencoder's images/s and 1.35× the denoiser's on 2 cores, the same quality
        # (benchmarks/bench_train_levers.py and bench_schedule.py, RESULTS.md).
        autoencoder_training=StageConfig(
            steps=600, batch_size=64, learning_rate=2e-3, warmup_steps=50, precision="bf16"
        ),
        # Steps, not images, set the quality at this budget: batch 64 at twice the rate
        # with a cosine decay matched batch 128 at a constant rate over 3 seeds (class
        # consistency 0.971 ± 0.003, FD 1.47 ± 0.02 against 0.966 ± 0.009, 1.51 ± 0.12),
        # in 0.6× the time; fewer steps lost badly (800 at batch 128: FD 4.6 to 10.6).
        denoiser_training=StageConfig(
            steps=1300,
            batch_size=64,
            learning_rate=2e-3,
            warmup_steps=100,
            lr_decay="cosine",
            ema_decay=0.995,
            precision="bf16",
        ),
        # bf16 too: 1.25× the steps/s, the same accuracy on noised latents (0.543 and
        # 0.541 against 0.549 and 0.537 in fp32 over t = 0, 100, …, 900; two seeds)
        classifier_training=StageConfig(
            steps=500, batch_size=128, learning_rate=1e-3, warmup_steps=50, precision="bf16"
        ),
    )


def _base() -> LDMConfig:
    # Sized for 64×64 RGB data on 8 GPUs (e.g. 2 nodes × 4 A100/H100), batch per worker.
    return LDMConfig(
        preset="base",
        image_size=64,
        image_channels=3,
        num_classes=10,
        autoencoder=AutoencoderConfig(
            image_channels=3, base_channels=128, channel_mult=(1, 2, 4), num_res_blocks=2
        ),
        denoiser=UNetConfig(
            model_channels=192, channel_mult=(1, 2, 3), num_res_blocks=2, dropout=0.1
        ),
        classifier=ClassifierConfig(model_channels=128, channel_mult=(1, 2, 3), num_res_blocks=2),
        # γ = 0.1 (the default, the DDPM-IP paper's): its gain is reported after long
        # training, the budget this preset has. At the demo's budget γ = 0 measured
        # better; at 4× that budget γ = 0.1 had the lower FD in every cell and γ = 0.15
        # matched it (one seed each, benchmarks/RESULTS.md), the paper's direction.
        diffusion=DiffusionConfig(num_timesteps=1000, beta_schedule="cosine"),
        autoencoder_training=StageConfig(
            steps=50_000, batch_size=64, learning_rate=4.5e-4, warmup_steps=1_000
        ),
        # On one H200 at this batch the eager step kept the GPU waiting on the host;
        # as one CUDA graph of compiled kernels it ran 4.3× faster (69.9 → 16.4 ms,
        # benchmarks/RESULTS.md). The graph needs a single worker; with several, the
        # compiled channels-last network still applies.
        denoiser_training=StageConfig(
            steps=200_000,
            batch_size=128,
            learning_rate=1e-4,
            warmup_steps=5_000,
            weight_decay=0.01,
            ema_decay=0.9999,
            log_every=100,
            channels_last=True,
            compile=True,
            cuda_graph=True,
        ),
        classifier_training=StageConfig(
            steps=50_000, batch_size=128, learning_rate=3e-4, warmup_steps=1_000, weight_decay=0.05
        ),
    )


PRESETS = {"tiny": _tiny, "demo": _demo, "base": _base}


def get_preset(name: PresetName) -> LDMConfig:
    """A fresh copy of the named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def over_preset(changes: Mapping[str, Any], preset: str) -> dict[str, Any]:
    """A model config's fields (to validate as an ``LDMConfig``) from ``changes``, a
    mapping that gives only what differs from a preset: the preset its own ``preset``
    field names, else ``preset``. ``{"denoiser": {"num_res_blocks": 2}}`` is the demo
    preset with two residual blocks a level. A mapping that names no preset (``preset:
    custom``) is taken as it is, and must be complete."""
    name = changes.get("preset", preset)
    if not isinstance(name, str) or name not in PRESETS:
        return dict(changes)
    return _merged(PRESETS[name]().model_dump(), changes)


def _merged(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged
