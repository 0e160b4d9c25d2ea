"""Sampling options shared by the commands that sample (``ldm sample``, ``ldm evaluate``)."""

from __future__ import annotations

import argparse


def add_eps_scaling_options(parser: argparse.ArgumentParser) -> None:
    """``--eps-scaling B`` and ``--eps-scaling-slope K``: ε̂ / (B + K·t/T) at every step
    (epsilon scaling against exposure bias, ``training.diffusion.exposure``)."""
    parser.add_argument(
        "--eps-scaling",
        type=float,
        default=1.0,
        help="epsilon scaling against exposure bias: ε̂ / (B + K·t/T); this is B, in [0.5, 2] "
        "(default 1: off)",
    )
    parser.add_argument(
        "--eps-scaling-slope", type=float, default=0.0, help="K of the same, in [-1, 1] (0)"
    )
