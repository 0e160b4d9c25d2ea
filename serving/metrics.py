"""Prometheus metrics of a replica's sampling engine, through Ray's metrics API.

Ray exports them on every node's metrics port (``ray start --metrics-export-port``,
scraped by Prometheus as its other ``ray_*`` series) with the Serve application,
deployment and replica as tags. The names, with Ray's ``ray_`` prefix:

- ``ray_ldm_waiting_images``: images of queued requests that have no row yet (the work
  that waits: what to scale replicas on),
- ``ray_ldm_active_images``: images being sampled,
- ``ray_ldm_images_per_forward``: a histogram of the images advanced by each step,
- ``ray_ldm_step_seconds``: a histogram of each step's time (forward, updates, decoding),
- ``ray_ldm_images_total``: images answered.
"""

from __future__ import annotations

from typing import Any

ROW_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
STEP_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]


class EngineMetrics:
    """The engine calls :meth:`after_step` after every step it reports."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.waiting = metrics.Gauge(
            "ldm_waiting_images", description="images of queued requests without a row"
        )
        self.active = metrics.Gauge("ldm_active_images", description="images being sampled")
        self.rows = metrics.Histogram(
            "ldm_images_per_forward",
            description="images advanced by one denoising step",
            boundaries=ROW_BUCKETS,
        )
        self.step = metrics.Histogram(
            "ldm_step_seconds", description="time of one denoising step", boundaries=STEP_BUCKETS
        )
        self.images = metrics.Counter("ldm_images_total", description="images answered")
        self._images_seen = 0

    def after_step(self, scheduler: Any) -> None:
        """``scheduler``: the replica's engine (serving.engine), after one of its steps."""
        stats = scheduler.stats
        self.rows.observe(stats.last_rows)
        self.step.observe(stats.last_step_s)
        self.waiting.set(scheduler.waiting_rows)
        self.active.set(scheduler.active_rows)
        if stats.images > self._images_seen:
            self.images.inc(stats.images - self._images_seen)
            self._images_seen = stats.images
