"""Where a training run starts when it does not start from scratch: from a checkpoint
of an earlier run (``--resume-from``, :mod:`training.ray.resume`) or from a registered
version's weights (``--init-from``, :mod:`training.ray.warm_start`). Both plans are
read by the driver the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from training.config import LDMConfig
from training.names import StageName
from training.stages import STAGE_NAMES


@dataclass(frozen=True)
class StartingPoint:
    """What the driver does differently from a run from scratch."""

    config: LDMConfig  # the model config: the source's networks, the job's step budgets
    finished: dict[StageName, str] = field(default_factory=dict)  # stages taken as they are
    stage_options: dict[StageName, dict[str, Any]] = field(default_factory=dict)  # StageJob's
    tags: dict[str, str] = field(default_factory=dict)  # on the MLflow run
    version_tags: dict[str, str] = field(default_factory=dict)  # on the registered version


def with_budgets(source: LDMConfig, job: LDMConfig) -> LDMConfig:
    """``source``'s networks and measurements with ``job``'s step budgets and schedules."""
    budgets = {f"{name}_training": getattr(job, f"{name}_training") for name in STAGE_NAMES}
    return source.model_copy(update=budgets)
