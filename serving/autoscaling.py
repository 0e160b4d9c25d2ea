"""How many sampling replicas the work needs: Serve's autoscaling policy for the app.

Serve's default rule counts HTTP requests. A request for 64 images and one for 1 image
count the same, and a replica holding 60 requests whose images all have rows is not
behind. Each replica therefore reports its scheduler's work (``record_autoscaling_stats``
in :mod:`serving.app`): the network rows of the images being sampled and of the images
waiting for a row (an image with classifier-free guidance counts twice). This policy
asks for enough replicas that each holds about ``target_rows_per_replica`` rows, by
default one full forward (``max_rows_per_forward``): work waiting behind full forwards
adds replicas, and replicas whose forwards run part-empty are removed. The request rule
still applies (the larger of the two wins), so requests piling up at the proxy before
they reach a replica's scheduler also add replicas.

Serve applies the bounds, delays and scaling factors of the deployment's
``autoscaling_config`` around this function. The policy is sent to Serve's controller by
value; it imports nothing of this project, as the controller may not have it.
"""

from __future__ import annotations

from typing import Any

# The keys of a replica's record_autoscaling_stats().
ACTIVE_ROWS = "active_rows"
WAITING_ROWS = "waiting_rows"
POLICY_PATH = "serving.autoscaling:WaitingWorkPolicy"


class WaitingWorkPolicy:
    """Replicas for the rows a deployment holds; Serve calls it every control loop."""

    def __init__(self, target_rows_per_replica: float) -> None:
        if target_rows_per_replica <= 0:
            raise ValueError(f"target_rows_per_replica must be > 0, got {target_rows_per_replica}")
        self.target_rows_per_replica = target_rows_per_replica

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        """``ctx``: Serve's ``AutoscalingContext``. Returns the wanted replica count
        (fractions are rounded up by Serve) and this policy's state (none)."""
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}
        by_requests = ctx.total_num_requests / ctx.config.get_target_ongoing_requests()
        return max(by_requests, self.replicas_for(ctx.aggregated_metrics)), {}

    def replicas_for(self, metrics: dict[str, dict[Any, float]] | None) -> float:
        """Replicas for the rows reported, ``metrics``: {key: {replica: rows averaged
        over the look-back period}}."""
        metrics = metrics or {}
        rows = sum(metrics.get(ACTIVE_ROWS, {}).values())
        rows += sum(metrics.get(WAITING_ROWS, {}).values())
        return rows / self.target_rows_per_replica
