"""Step-level scheduling: every image reproducible alone, in a mix and joining mid-chain;
short requests not held behind long ones; guidance costs only the rows that use it;
first come, first served under a row cap; cancellation and faults stay local."""

import threading

import numpy as np
import pytest
import torch

from serving.forward import CudaGraphed, FixedWidth, LatentDecoder
from serving.sampler import SampleFailure, SampleJob, SampleResult, generators_for
from serving.scheduler import StepScheduler
from training.images import to_uint8
from training.latent_diffusion import LatentDiffusion
from training.presets import get_preset


@pytest.fixture(scope="module")
def model() -> LatentDiffusion:
    torch.manual_seed(0)
    model = LatentDiffusion.build(get_preset("tiny").for_data(32, 1, 10))
    with torch.no_grad():  # a fresh UNet predicts ε = 0; make the network matter
        model.denoiser.conv_out.weight.normal_(0, 0.05)
    return model.eval()


def _job(
    labels, seed, guidance=0.0, classifier=0.0, sampler="ddim", steps=4, eta=0.0, b=1.0, k=0.0
):
    return SampleJob(tuple(labels), guidance, classifier, sampler, steps, eta, seed, b, k)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to ±2 levels on at most 1% of the pixels (batch-size rounding)."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return a.shape == b.shape and diff.max() <= 2 and (diff > 0).mean() <= 0.01


class Collector:
    """Outcomes by request, in the order they were answered."""

    def __init__(self):
        self.outcomes: dict[int, SampleResult | SampleFailure] = {}
        self.order: list[int] = []

    def __call__(self, key):
        def done(outcome):
            assert key not in self.outcomes, "on_done called twice"
            self.outcomes[key] = outcome
            self.order.append(key)

        return done


def _run(scheduler, limit=10_000):
    for _ in range(limit):
        if not scheduler.step():
            return
    raise AssertionError("the scheduler did not finish")


def _alone(model, job) -> np.ndarray:
    """The request sampled by itself, through GaussianDiffusion.sample (not the scheduler)."""
    pixels = model.sample(
        torch.tensor(job.labels),
        guidance_scale=job.guidance_scale,
        classifier_scale=job.classifier_scale,
        sampler=job.sampler,
        steps=job.steps,
        eta=job.eta,
        generator=generators_for(job.seed, len(job.labels)),
        eps_scaling=job.eps_scaling,
        eps_scaling_slope=job.eps_scaling_slope,
    )
    return to_uint8(pixels)


MIX = [
    _job([3, 3], seed=1, guidance=3.0),
    _job([1], seed=2),  # w = 0 beside w = 3
    _job([7, 2, 5], seed=3, classifier=1.0),
    _job([4], seed=4, sampler="ddpm", steps=3),
    _job([0, 9], seed=5, steps=6, eta=0.5),
    _job([6, 8], seed=6, sampler="dpmpp_2m", steps=5, guidance=1.5, classifier=0.5),
    _job([2, 5], seed=7, guidance=2.0, b=1.2, k=0.3),  # epsilon scaling, per row
]


def test_a_request_alone_matches_the_single_process_sampler(model):
    for job in MIX:
        scheduler, got = StepScheduler(), Collector()
        scheduler.submit(model, job, got(0))
        _run(scheduler)
        result = got.outcomes[0]
        assert isinstance(result, SampleResult)
        assert _close(result.images, _alone(model, job)), job
        assert result.report.forwards == job.steps


def test_a_mix_of_samplers_steps_and_guidance_matches_each_alone(model):
    scheduler, got = StepScheduler(), Collector()
    for key, job in enumerate(MIX):
        scheduler.submit(model, job, got(key))
    _run(scheduler)
    assert scheduler.stats.forwards == max(job.steps for job in MIX)  # one forward a step
    for key, job in enumerate(MIX):
        result = got.outcomes[key]
        assert _close(result.images, _alone(model, job)), job
        assert result.report.max_requests_per_forward == len(MIX)


def test_a_request_joining_mid_chain_matches_it_alone(model):
    scheduler, got = StepScheduler(), Collector()
    scheduler.submit(model, _job([1, 2], seed=10, sampler="dpmpp_2m", steps=12), got("long"))
    for _ in range(3):
        scheduler.step()
    for key, job in enumerate(MIX):
        scheduler.submit(model, job, got(key))
    _run(scheduler)
    assert got.outcomes["long"].report.max_requests_per_forward == 1 + len(MIX)
    for key, job in enumerate(MIX):
        assert _close(got.outcomes[key].images, _alone(model, job)), job
    long_alone = _alone(model, _job([1, 2], seed=10, sampler="dpmpp_2m", steps=12))
    assert _close(got.outcomes["long"].images, long_alone)


def test_under_bf16_autocast_an_image_is_the_same_alone_in_a_mix_and_joining(model):
    """The network runs in bf16 (seen by a hook), the updates in float32; each request's
    images keep the tolerance of serving.sampler between the three situations."""
    dtypes = set()
    hook = model.denoiser.conv_out.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    try:
        alone = {}
        for key, job in enumerate(MIX):
            scheduler, got = StepScheduler(autocast=torch.bfloat16), Collector()
            scheduler.submit(model, job, got(key))
            _run(scheduler)
            alone[key] = got.outcomes[key].images
        mixed, got = StepScheduler(autocast=torch.bfloat16), Collector()
        mixed.submit(model, _job([1, 2], seed=10, steps=12), got("long"))
        for _ in range(3):
            mixed.step()
        for key, job in enumerate(MIX):
            mixed.submit(model, job, got(key))
        _run(mixed)
    finally:
        hook.remove()
    assert dtypes == {torch.bfloat16}
    for key, job in enumerate(MIX):
        assert _close(got.outcomes[key].images, alone[key]), job


def test_a_short_request_finishes_in_its_own_steps_beside_long_ones(model):
    scheduler, got = StepScheduler(), Collector()
    for key in range(4):
        scheduler.submit(model, _job([key], seed=key, steps=100), got(f"long{key}"))
    for _ in range(5):
        scheduler.step()
    scheduler.submit(model, _job([5], seed=5, steps=10), got("short"))
    for _ in range(10):
        scheduler.step()
    assert list(got.outcomes) == ["short"]  # done after its own 10 steps, long ones running
    assert got.outcomes["short"].report.forwards == 10
    assert scheduler.active_rows == 4


class CountingNet(torch.nn.Module):
    """Wraps a network and records the batch size of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.sizes = net, []
        self.num_classes = getattr(net, "num_classes", None)

    def forward(self, *args):
        self.sizes.append(len(args[0]))
        return self.net(*args)


def test_guidance_costs_only_the_rows_that_use_it(model):
    counted = LatentDiffusion(
        model.config,
        model.autoencoder,
        CountingNet(model.denoiser),
        CountingNet(model.classifier),
    )
    scheduler, got = StepScheduler(), Collector()
    scheduler.submit(counted, _job([1, 2, 3], seed=0, steps=2), got(0))  # w = 0, s = 0
    scheduler.submit(counted, _job([4], seed=0, steps=2, guidance=2.0), got(1))  # CFG
    scheduler.submit(counted, _job([5, 6], seed=0, steps=2, classifier=1.0), got(2))
    _run(scheduler)
    assert counted.denoiser.sizes == [6 + 1, 6 + 1]  # six conditional rows, one null row
    assert counted.classifier.sizes == [2, 2]


def test_rows_are_capped_and_admitted_first_come_first_served(model):
    counted = LatentDiffusion(
        model.config, model.autoencoder, CountingNet(model.denoiser), model.classifier
    )
    scheduler, got = StepScheduler(max_rows_per_forward=4), Collector()
    scheduler.submit(counted, _job([1, 2, 3], seed=0, steps=6), got("a"))
    scheduler.submit(counted, _job([4, 5], seed=0, steps=2, guidance=1.0), got("b"))  # 2 rows each
    scheduler.submit(counted, _job([6], seed=0, steps=2), got("c"))  # fits, but must not overtake b
    _run(scheduler)
    # a's three rows leave room for 1: b's first CFG row (2) waits, and c (1 row, it
    # would fit) waits behind b; then b's two guided rows fill the forward of 4.
    assert counted.denoiser.sizes == [3] * 6 + [4] * 2 + [1] * 2
    assert got.order == ["a", "b", "c"]


def test_network_rows_count_the_work_held_and_waiting(model):
    """What autoscaling sees: rows of active images and of waiting ones, a guided image
    counting twice, a cancelled request not at all."""
    scheduler = StepScheduler(max_rows_per_forward=4)
    scheduler.submit(model, _job([1, 2, 3], seed=0, steps=6), lambda _: None)
    guided = scheduler.submit(model, _job([4, 5], seed=0, guidance=1.0), lambda _: None)
    scheduler.submit(model, _job([6], seed=0), lambda _: None)
    assert scheduler.network_rows() == (0, 3 + 2 * 2 + 1)
    scheduler.step()
    assert scheduler.network_rows() == (3, 2 * 2 + 1)
    scheduler.cancel(guided)
    assert scheduler.network_rows() == (3, 1)
    _run(scheduler)
    assert scheduler.network_rows() == (0, 0)


def test_without_joining_a_request_waits_for_the_running_batch(model):
    scheduler, got = StepScheduler(join_running=False), Collector()
    scheduler.submit(model, _job([1], seed=0, steps=20), got("long"))
    scheduler.step()
    scheduler.submit(model, _job([2], seed=0, steps=2), got("short"))
    _run(scheduler)
    assert got.order == ["long", "short"]
    assert got.outcomes["short"].report.max_requests_per_forward == 1


def test_a_cancelled_request_is_dropped_at_the_next_step(model):
    scheduler, got = StepScheduler(), Collector()
    ticket = scheduler.submit(model, _job([1, 2], seed=0, steps=10), got("gone"))
    scheduler.submit(model, _job([3], seed=0, steps=10), got("kept"))
    scheduler.step()
    scheduler.cancel(ticket)
    scheduler.step()
    assert scheduler.active_rows == 1
    _run(scheduler)
    assert list(got.outcomes) == ["kept"] and scheduler.stats.cancelled == 1


def test_a_failing_request_does_not_fail_the_others(model):
    scheduler, got = StepScheduler(), Collector()
    # A class id past the embedding: a server-side fault inside the shared forward.
    scheduler.submit(model, _job([42], seed=0, steps=3), got("bad"))
    scheduler.submit(model, _job([1], seed=0, steps=3), got("good"))
    _run(scheduler)
    assert isinstance(got.outcomes["bad"], SampleFailure)
    assert "sampling failed" in got.outcomes["bad"].message
    assert _close(got.outcomes["good"].images, _alone(model, _job([1], seed=0, steps=3)))
    assert (scheduler.stats.failed, scheduler.stats.requests) == (1, 1)


def test_two_model_versions_share_a_step_but_not_a_forward(model):
    other = LatentDiffusion.build(model.config).eval()
    with torch.no_grad():
        other.denoiser.conv_out.weight.normal_(0, 0.05)
    scheduler, got = StepScheduler(), Collector()
    scheduler.submit(model, _job([1], seed=0), got("a"))
    scheduler.submit(other, _job([1], seed=0), got("b"))
    _run(scheduler)
    assert _close(got.outcomes["a"].images, _alone(model, _job([1], seed=0)))
    assert _close(got.outcomes["b"].images, _alone(other, _job([1], seed=0)))
    assert not np.array_equal(got.outcomes["a"].images, got.outcomes["b"].images)


def test_the_sampling_thread_answers_and_stops(model):
    scheduler, got, stop = StepScheduler(), Collector(), threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(stop,))
    thread.start()
    answered = threading.Event()
    scheduler.submit(model, _job([1], seed=0), lambda outcome: answered.set())
    assert answered.wait(30)
    stop.set()
    scheduler.wake()
    thread.join(5)
    assert not thread.is_alive()
    assert got.outcomes == {} and scheduler.stats.requests == 1


def test_max_rows_must_be_positive():
    with pytest.raises(ValueError, match="max_rows_per_forward"):
        StepScheduler(max_rows_per_forward=0)


def test_a_failing_callback_does_not_stop_the_loop(model):
    scheduler, got = StepScheduler(), Collector()

    def broken(outcome):
        raise RuntimeError("the caller's loop is closed")

    scheduler.submit(model, _job([1], seed=0, steps=2), broken)
    scheduler.submit(model, _job([2], seed=0, steps=3), got("next"))
    _run(scheduler)
    assert isinstance(got.outcomes["next"], SampleResult)


class WidthDependentNet(CountingNet):
    """A network whose output moves with the size of its batch, as a GPU's does when
    its kernels sum in another order for another width (here far more than rounding,
    so that it shows in the pixels)."""

    def forward(self, *args):
        return super().forward(*args) + 0.02 * len(args[0])


class DecodingWith(torch.nn.Module):
    """An autoencoder whose latent decoding is ``net`` (a CountingNet over the real one)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def decode_latents(self, z0):
        return self.net(z0).clamp(-1.0, 1.0)


def _decoding_with(model, wrapper) -> LatentDiffusion:
    autoencoder = DecodingWith(wrapper(LatentDecoder(model.autoencoder)))
    return LatentDiffusion(model.config, autoencoder, model.denoiser, model.classifier)


def test_batch_invariant_requests_finishing_at_one_step_are_decoded_together(model):
    jobs = {"a": _job([1], seed=1), "b": _job([2, 3], seed=2), "c": _job([4, 5, 6], seed=3)}
    for invariant, calls in ((True, [4, 4, 4]), (False, [1, 1, 2, 3])):
        counted = _decoding_with(model, CountingNet)
        scheduler, got = StepScheduler(decode_width=4, batch_invariant=invariant), Collector()
        for key, job in jobs.items():
            scheduler.submit(counted, job, got(key))
        scheduler.submit(counted, _job([7], seed=4, steps=2), got("early"))
        _run(scheduler)
        # "early" at its second step; then, batch invariant, the six images of three
        # requests in two calls of four (padded), else one call per request
        assert counted.autoencoder.net.sizes == calls
        for key, job in jobs.items():
            assert _close(got.outcomes[key].images, _alone(model, job)), key
            assert got.outcomes[key].images.shape[0] == len(job.labels)
        assert scheduler.stats.images == 7


class FailsOnMore(CountingNet):
    """Decodes at most ``limit`` images a call, like a decoder out of memory beyond."""

    def __init__(self, net, limit):
        super().__init__(net)
        self.limit = limit

    def forward(self, *args):
        if len(args[0]) > self.limit:
            raise RuntimeError(f"{len(args[0])} images do not fit")
        return super().forward(*args)


class FailsFirst(CountingNet):
    """Fails its first call, as a transient fault would."""

    def forward(self, *args):
        if not self.sizes:
            self.sizes.append("failed")
            raise RuntimeError("transient")
        return super().forward(*args)


def test_a_failing_decode_fails_only_the_request_at_fault(model):
    fragile = _decoding_with(model, lambda net: FailsOnMore(net, 2))
    scheduler, got = StepScheduler(), Collector()
    for key, labels in {"one": [1], "two": [2, 3], "three": [4, 5, 6]}.items():
        scheduler.submit(fragile, _job(labels, seed=0), got(key))
    _run(scheduler)
    assert isinstance(got.outcomes["three"], SampleFailure)
    assert "3 images do not fit" in got.outcomes["three"].message
    assert _close(got.outcomes["one"].images, _alone(model, _job([1], seed=0)))
    assert _close(got.outcomes["two"].images, _alone(model, _job([2, 3], seed=0)))
    assert (scheduler.stats.failed, scheduler.stats.requests) == (1, 2)
    # A failed joint decode is retried one request at a time.
    flaky = _decoding_with(model, FailsFirst)
    scheduler, got = StepScheduler(16, batch_invariant=True, decode_width=8), Collector()
    for key, labels in {"one": [1], "two": [2, 3]}.items():
        scheduler.submit(flaky, _job(labels, seed=0), got(key))
    _run(scheduler)
    assert flaky.autoencoder.net.sizes == ["failed", 8, 8]
    assert isinstance(got.outcomes["one"], SampleResult)
    assert isinstance(got.outcomes["two"], SampleResult)
    with pytest.raises(ValueError, match="decode_width"):
        StepScheduler(decode_width=0)


def test_fixed_width_pads_and_chunks_without_touching_real_rows():
    net = CountingNet(torch.nn.Linear(3, 2))
    x = torch.randn(10, 3, requires_grad=True)
    out = FixedWidth(net, 4)(x)
    assert net.sizes == [4, 4, 4]  # 10 rows: 4 + 4 + 2 padded to 4
    torch.testing.assert_close(out, net.net(x))
    out.sum().backward()  # the padding copies of row 9 are cut off: no gradient from them
    torch.testing.assert_close(x.grad, net.net.weight.sum(0).expand(10, 3))


class Unconditional(torch.nn.Module):
    def forward(self, x, y):
        assert y is None  # None passes through, unpadded
        return 2 * x


def test_fixed_width_passes_none_through():
    x = torch.randn(3, 2)
    torch.testing.assert_close(FixedWidth(Unconditional(), 4)(x, None), 2 * x)
    with pytest.raises(ValueError, match="width"):
        FixedWidth(Unconditional(), 0)


def test_batch_invariant_images_are_identical_alone_in_a_mix_and_joining(model):
    """With a width-dependent network, images change with what they are batched with;
    with batch_invariant every call is max_rows_per_forward wide and nothing moves."""
    decoder = WidthDependentNet(LatentDecoder(model.autoencoder))
    wobbly = LatentDiffusion(
        model.config,
        DecodingWith(decoder),
        WidthDependentNet(model.denoiser),
        WidthDependentNet(model.classifier),
    )

    def sample(batch_invariant: bool, with_others: bool) -> dict:
        scheduler = StepScheduler(24, batch_invariant=batch_invariant, decode_width=8)
        got = Collector()
        if with_others:  # a long request runs three steps before the mix joins it
            scheduler.submit(wobbly, _job([1, 2], seed=10, sampler="dpmpp_2m", steps=12), got("x"))
            for _ in range(3):
                scheduler.step()
            for key, job in enumerate(MIX):
                scheduler.submit(wobbly, job, got(key))
        else:
            for key, job in enumerate(MIX):
                scheduler.submit(wobbly, job, got(key))
                _run(scheduler)
        _run(scheduler)
        return {key: got.outcomes[key].images for key in range(len(MIX))}

    alone, mixed = sample(False, False), sample(False, True)
    assert any(not np.array_equal(alone[k], mixed[k]) for k in alone)  # the net is wobbly
    for net in (wobbly.denoiser, wobbly.classifier, decoder):
        net.sizes.clear()
    alone, mixed = sample(True, False), sample(True, True)
    for key, job in enumerate(MIX):
        assert np.array_equal(alone[key], mixed[key]), job
    assert set(wobbly.denoiser.sizes) == {24} and set(wobbly.classifier.sizes) == {24}
    assert set(decoder.sizes) == {8}


def test_a_cuda_graph_needs_one_width_and_a_cuda_model(model):
    with pytest.raises(ValueError, match="batch_invariant"):
        StepScheduler(cuda_graph=True)
    scheduler, got = StepScheduler(16, batch_invariant=True, cuda_graph=True), Collector()
    scheduler.submit(model, MIX[0], got(0))
    _run(scheduler)  # a CPU model: fixed width, no graph
    assert _close(got.outcomes[0].images, _alone(model, MIX[0]))
    with pytest.raises(RuntimeError, match="no_grad"):  # before anything touches CUDA
        CudaGraphed(model.denoiser)(torch.zeros(1, 1))
