"""Sampling options shared by the commands that sample (``ldm sample``, ``ldm evaluate``)."""

from __future__ import annotations

import argparse


def add_eps_scaling_options(parser: argparse.ArgumentParser, default_b: float | None = 1.0) -> None:
    """``--eps-scaling B`` and ``--eps-scaling-slope K``: ε̂ / (B + K·t/T) at every step
    (epsilon scaling against exposure bias, ``training.diffusion.exposure``). With
    ``default_b=None`` (a request to an endpoint) an absent B leaves it to the version."""
    shown = "the b searched for the served version, else 1" if default_b is None else "1: off"
    parser.add_argument(
        "--eps-scaling",
        type=float,
        default=default_b,
        help="epsilon scaling against exposure bias: ε̂ / (B + K·t/T); this is B, in [0.5, 2] "
        f"(default: {shown})",
    )
    parser.add_argument(
        "--eps-scaling-slope", type=float, default=0.0, help="K of the same, in [-1, 1] (0)"
    )
