"""Counters of one replica's sampling engine, shown under ``stats`` in ``GET /v1/model``."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EngineStats:
    """What one replica's scheduler did since it started."""

    forwards: int = 0  # denoising steps run (one network forward per model version each)
    rows: int = 0  # images advanced, summed over forwards
    requests: int = 0  # requests answered with images
    images: int = 0
    failed: int = 0  # requests that failed on the server
    cancelled: int = 0  # requests dropped because their client left or they timed out
    rejected: int = 0  # requests refused with a 4xx before sampling
    timed_out: int = 0  # requests answered 504 after request_timeout_s
    step_s: float = 0.0  # summed over forwards
    last_step_s: float = 0.0
    last_rows: int = 0
    rows_per_forward: Counter = field(default_factory=Counter)
    finished: deque = field(default_factory=lambda: deque(maxlen=4096))  # (time, images)

    def record_step(self, rows: int, seconds: float) -> None:
        self.forwards += 1
        self.rows += rows
        self.step_s += seconds
        self.last_step_s = seconds
        self.last_rows = rows
        self.rows_per_forward[rows] += 1

    def record_answer(self, images: int) -> None:
        self.requests += 1
        self.images += images
        self.finished.append((time.perf_counter(), images))

    def images_per_s(self, window_s: float = 30.0) -> float:
        """Images answered per second over the last ``window_s``."""
        now = time.perf_counter()
        return sum(n for t, n in self.finished if now - t <= window_s) / window_s

    def as_dict(self, waiting_rows: int, active_rows: int) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "images": self.images,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "rejected": self.rejected,
            "timed_out": self.timed_out,
            "forwards": self.forwards,
            "rows": self.rows,
            "mean_rows_per_forward": round(self.rows / self.forwards, 3) if self.forwards else 0,
            "max_rows_per_forward": max(self.rows_per_forward, default=0),
            "mean_step_s": round(self.step_s / self.forwards, 5) if self.forwards else 0,
            "last_step_s": round(self.last_step_s, 5),
            "images_per_s_30s": round(self.images_per_s(), 3),
            "waiting_rows": waiting_rows,
            "active_rows": active_rows,
        }
