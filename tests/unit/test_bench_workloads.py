"""The serving benchmarks' workloads: the short load is the mixed one cut to its
fewest steps, request for request, and an unknown load is refused."""

from __future__ import annotations

import pytest

from benchmarks.workloads import MIXED_STEPS, UNIFORM, request_settings


def test_short_load_is_the_mixed_draw_at_its_fewest_steps():
    mixed = [request_settings("mixed", client, i) for client in range(4) for i in range(50)]
    short = [request_settings("short", client, i) for client in range(4) for i in range(50)]
    assert {s["steps"] for s in mixed} == set(MIXED_STEPS)
    assert {s["steps"] for s in short} == {min(MIXED_STEPS)}
    for m, s in zip(mixed, short, strict=True):
        assert (m["sampler"], m["guidance_scale"]) == (s["sampler"], s["guidance_scale"])
    assert request_settings("uniform", 3, 7) == UNIFORM


def test_unknown_workload_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="uniform, mixed, short"):
        request_settings("mixd", 0, 0)
