"""Search the epsilon scaling b of a model version on its val split and keep it with the
version, for the endpoint to use by default.

For each (sampler, steps) cell, every b of a grid is evaluated with the same seeds as an
ordinary evaluation (``evaluate_model``, k = 0); the b with the best promotion metric
(lowest FD, or highest class consistency) wins, a tie going to the b nearest 1. The
table is stored as the registry tag :data:`EPS_SCALING_TAG` on the version, where the
serving replica reads it (:class:`training.diffusion.exposure.EpsScalingDefaults`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import get_args

from mlflow import MlflowClient

from training.diffusion.exposure import EpsScalingDefaults
from training.evaluation.evaluator import Evaluator
from training.evaluation.scoring import EvaluationSettings, evaluate_model
from training.latent_diffusion import LatentDiffusion
from training.mlflow.tracking import EPS_SCALING_TAG
from training.names import PromotionMetric, SamplerName

# Few steps are where exposure bias costs most (and where the digits models gain).
DEFAULT_CELLS = (("ddim", 10), ("ddim", 20), ("dpmpp_2m", 20))
DEFAULT_SCALES = (0.96, 0.97, 0.98, 0.99, 1.0, 1.01)


@dataclass
class EpsSearch:
    """The chosen b per cell and every measurement behind it."""

    defaults: EpsScalingDefaults
    measured: dict[tuple[str, int], dict[float, dict[str, float]]] = field(default_factory=dict)

    def summary(self) -> list[str]:
        lines = []
        for (sampler, steps), by_b in self.measured.items():
            best = self.defaults.table[sampler][steps]
            cells = ", ".join(
                f"{b:g}: fd {m['fd']:.3f} cc {m['class_consistency']:.3f}"
                for b, m in sorted(by_b.items())
            )
            lines.append(f"{sampler} {steps} steps: b = {best:g} ({cells})")
        return lines


def parse_cells(text: str) -> tuple[tuple[str, int], ...]:
    """``ddim10,dpmpp_2m20`` → (("ddim", 10), ("dpmpp_2m", 20)); ValueError if not so."""
    cells = []
    for cell in text.split(","):
        match = re.fullmatch(r"([a-z_0-9]*?[a-z_])(\d+)", cell.strip())
        if match is None or match[1] not in get_args(SamplerName) or int(match[2]) < 1:
            samplers = ", ".join(get_args(SamplerName))
            raise ValueError(f"{cell!r} is not SAMPLER+STEPS (samplers: {samplers}), e.g. ddim10")
        cells.append((match[1], int(match[2])))
    return tuple(cells)


def search_eps_scaling(
    model: LatentDiffusion,
    data_url: str,
    evaluator: Evaluator,
    settings: EvaluationSettings,
    cells: tuple[tuple[str, int], ...] = DEFAULT_CELLS,
    scales: tuple[float, ...] = DEFAULT_SCALES,
    metric: PromotionMetric = "fd",
    progress: bool = False,
) -> EpsSearch:
    """Evaluate every b of ``scales`` at every cell (the rest of ``settings`` as given)."""
    if 1.0 not in scales:
        scales = (*scales, 1.0)  # the baseline is always measured
    search = EpsSearch(EpsScalingDefaults({}))
    for sampler, steps in cells:
        by_b: dict[float, dict[str, float]] = {}
        for b in scales:
            cell = settings.model_copy(
                update={
                    "sampler": sampler,
                    "steps": steps,
                    "eps_scaling": b,
                    "eps_scaling_slope": 0.0,
                    "exposure_samples": 0,
                }
            )
            label = f"{sampler} {steps} steps, b = {b:g}" if progress else None
            by_b[b] = evaluate_model(model, data_url, evaluator, cell, progress=label).metrics
        search.measured[(sampler, steps)] = by_b
        sign = 1.0 if metric == "fd" else -1.0
        best = min(by_b, key=lambda b: (sign * by_b[b][metric], abs(b - 1.0)))
        search.defaults.table.setdefault(sampler, {})[steps] = best
    return search


def store_eps_scaling(
    tracking_uri: str, name: str, version: str, defaults: EpsScalingDefaults
) -> None:
    """Keep the table with the version (the endpoint reads it when it loads the version)."""
    client = MlflowClient(tracking_uri)
    client.set_model_version_tag(name, version, EPS_SCALING_TAG, defaults.to_json())
