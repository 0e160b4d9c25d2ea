"""Batched sampling of several requests: grouping, per-request seeds, failures."""

import numpy as np
import pytest
import torch

from serving.sampler import (
    SampleFailure,
    SampleJob,
    SampleResult,
    generators_for,
    group_compatible,
    sample_batch,
    sample_group,
)
from serving.stats import BatchStats
from training.latent_diffusion import LatentDiffusion
from training.presets import get_preset


@pytest.fixture(scope="module")
def model() -> LatentDiffusion:
    torch.manual_seed(0)
    model = LatentDiffusion.build(get_preset("tiny").for_data(32, 1, 10))
    with torch.no_grad():  # a fresh UNet predicts ε = 0; make the network matter
        model.denoiser.conv_out.weight.normal_(0, 0.05)
    return model.eval()


def _job(labels, seed, guidance=0.0, classifier=0.0, sampler="ddim", steps=4, eta=0.0):
    return SampleJob(tuple(labels), guidance, classifier, sampler, steps, eta, seed)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to ±2 levels on at most 1% of the pixels (batch-size rounding)."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return a.shape == b.shape and diff.max() <= 2 and (diff > 0).mean() <= 0.01


def test_generators_are_seeded_per_image():
    a, b = generators_for(5, 2), generators_for(6, 1)
    assert torch.equal(torch.randn(3, generator=a[1]), torch.randn(3, generator=b[0]))


def test_groups_keep_first_appearance_order():
    assert group_compatible(["a", "b", "a", "c", "b"]) == [[0, 2], [1, 4], [3]]


def test_batched_requests_match_the_same_requests_alone(model):
    jobs = [
        _job([3, 3], seed=1, guidance=3.0),
        _job([1], seed=2),  # w = 0 next to w = 3 in one forward
        _job([7, 2, 5], seed=3, classifier=1.0),
        _job([4], seed=4, sampler="ddpm", steps=3),  # another group
        _job([0, 9], seed=5, steps=5),  # another group
    ]
    batched = sample_batch([(model, job) for job in jobs])
    reports = [r.report for r in batched]
    assert [(r.call_requests, r.group_requests, r.group_images) for r in reports] == [
        (5, 3, 6),
        (5, 3, 6),
        (5, 3, 6),
        (5, 1, 1),
        (5, 1, 2),
    ]
    for job, result in zip(jobs, batched, strict=True):
        alone = sample_batch([(model, job)])[0]
        assert result.images.shape == (len(job.labels), 32, 32, 1)
        assert _close(result.images, alone.images), job


def test_seed_and_settings_change_the_images(model):
    base = sample_group(model, [_job([3], seed=1)])[0]
    assert not np.array_equal(base, sample_group(model, [_job([3], seed=2)])[0])
    assert not np.array_equal(base, sample_group(model, [_job([3], seed=1, steps=5)])[0])


def test_sample_group_refuses_mixed_settings(model):
    with pytest.raises(ValueError, match="one sampler, step count and eta"):
        sample_group(model, [_job([1], 0), _job([1], 0, steps=5)])


def test_a_failing_group_does_not_fail_the_others(model):
    bad = _job([42], seed=0, steps=3)  # class id past the embedding: a server-side fault
    good = _job([1], seed=0)
    results = sample_batch([(model, bad), (model, good)])
    assert isinstance(results[0], SampleFailure) and "sampling failed" in results[0].message
    assert isinstance(results[1], SampleResult)
    stats = BatchStats()
    stats.record(results)
    assert stats.as_dict() | {"groups_by_size": None} == {
        "calls": 1,
        "groups": 1,
        "requests": 1,
        "images": 1,
        "failed": 1,
        "rejected": 0,
        "timed_out": 0,
        "max_group_requests": 1,
        "groups_by_size": None,
    }


def test_different_model_objects_are_never_merged(model):
    other = LatentDiffusion.build(model.config).eval()
    results = sample_batch([(model, _job([1], 0)), (other, _job([1], 0))])
    assert [r.report.group_requests for r in results] == [1, 1]
