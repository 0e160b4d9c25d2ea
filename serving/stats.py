"""Counters of one replica's batches, shown under ``stats`` in ``GET /v1/model``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from serving.sampler import SampleFailure, SampleResult


@dataclass
class BatchStats:
    """How requests were batched in this replica since it started."""

    calls: int = 0  # @serve.batch calls
    groups: int = 0  # network chains (compatible groups) run
    requests: int = 0  # requests sampled
    images: int = 0
    failed: int = 0  # requests whose group failed on the server
    rejected: int = 0  # requests refused with a 4xx before sampling
    timed_out: int = 0  # requests answered 504 after request_timeout_s
    group_requests: Counter = field(default_factory=Counter)  # group size → how many groups

    def record(self, results: Sequence[SampleResult | SampleFailure]) -> None:
        self.calls += 1
        seen: set[int] = set()
        for result in results:
            if isinstance(result, SampleFailure):
                self.failed += 1
                continue
            self.requests += 1
            self.images += len(result.images)
            if id(result.report) not in seen:
                seen.add(id(result.report))
                self.groups += 1
                self.group_requests[result.report.group_requests] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "groups": self.groups,
            "requests": self.requests,
            "images": self.images,
            "failed": self.failed,
            "rejected": self.rejected,
            "timed_out": self.timed_out,
            "max_group_requests": max(self.group_requests, default=0),
            "groups_by_size": {str(k): v for k, v in sorted(self.group_requests.items())},
        }
