"""One console line per stage at its logging intervals: where it is, how fast, when it ends.

    denoiser   400/1500  27%  loss 0.0412  480 img/s  ETA 2m18s

Rank 0 of a Ray Train stage prints it (Ray shows a worker's output on the driver's
console), and so does the in-process training of ``ldm demo``. So that a long stage
does not flood the console, a line is printed at a logging interval only when a tenth
of the stage or a minute has passed since the previous one; the first interval and the
last step always print. The speed and ETA are averaged since the stage (re)started.
Ray Train's and MLflow's own INFO logs stay off the console unless the job is
``verbose``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

MIN_FRACTION = 0.1  # of the stage's steps between two lines …
MAX_SILENCE_S = 60.0  # … unless this long passed


def format_duration(seconds: float) -> str:
    """65 → '1m05s', 3700 → '1h01m', 9 → '9s'."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class StageProgress:
    """Progress lines of one stage from ``start_step`` to ``total`` steps."""

    def __init__(
        self,
        stage: str,
        total: int,
        images_per_step: int,
        start_step: int = 0,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stage, self.total, self.images_per_step = stage, total, images_per_step
        self.start_step, self.clock = start_step, clock
        self.out = out
        self.started = clock()
        self.printed_step: int | None = None
        self.printed_at = self.started

    def line(self, step: int, loss: float) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        done = step - self.start_step
        rate = done / elapsed  # steps per second
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        width = len(str(self.total))
        return (
            f"{self.stage:<11} {step:>{width}}/{self.total}  {100 * step / self.total:3.0f}%  "
            f"loss {loss:.4f}  {rate * self.images_per_step:,.0f} img/s  "
            f"ETA {format_duration(eta) if eta != float('inf') else '?'}"
        )

    def due(self, step: int) -> bool:
        if step >= self.total or self.printed_step is None:
            return True
        far = step - self.printed_step >= MIN_FRACTION * self.total
        return far or self.clock() - self.printed_at >= MAX_SILENCE_S

    def update(self, step: int, loss: float) -> str | None:
        """At a logging interval: print the line if it is due; the line printed."""
        if not self.due(step):
            return None
        text = self.line(step, loss)
        # Written, not printed: Ray Train turns a worker's print into a log record and,
        # where stdout is wrapped, prints it as well (twice on the console).
        stream = self.out or sys.stdout
        stream.write(text + "\n")
        stream.flush()
        self.printed_step, self.printed_at = step, self.clock()
        return text


def quiet_libraries(verbose: bool) -> None:
    """MLflow's INFO logs (system metrics started, tables created, examples validated,
    versions created) and its artifact download bars only with ``verbose``; its
    warnings always. Set before a local Ray starts, the workers it starts inherit the
    setting. Ray Train's own logs are set per stage (``RunConfig.logging_config``)."""
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("mlflow").setLevel(level)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "true" if verbose else "false"
    try:  # Ray Train's "Reporting training result" line per checkpoint and rank
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(level)  # named after its file
