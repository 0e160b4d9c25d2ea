"""The sampling engine in its own process: the same images as the scheduler in this
process, cancellation, several model versions, the work autoscaling reads, and no
request left hanging (or process left behind) when either side dies."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from serving.engine import EngineProcess, EngineSettings, scheduler_options, start_engine
from serving.sampler import SampleFailure, SampleJob, SampleResult
from serving.scheduler import StepScheduler
from training.latent_diffusion import LatentDiffusion
from training.presets import get_preset

SETTINGS = EngineSettings(
    max_rows_per_forward=64, join_running=True, autocast="off", torch_threads=1, device="cpu"
)


def _model(seed: int) -> LatentDiffusion:
    torch.manual_seed(seed)
    model = LatentDiffusion.build(get_preset("tiny").for_data(32, 1, 10))
    with torch.no_grad():  # a fresh UNet predicts ε = 0; make the network matter
        model.denoiser.conv_out.weight.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> LatentDiffusion:
    return _model(0)


@pytest.fixture(scope="module")
def engine():
    engine = EngineProcess(SETTINGS)
    yield engine
    engine.close()


class Outcomes:
    """on_done callbacks that record each outcome and let a test wait for them."""

    def __init__(self):
        self.got: dict[object, SampleResult | SampleFailure] = {}
        self.calls: list[object] = []
        self._changed = threading.Condition()

    def __call__(self, key):
        def done(outcome):
            with self._changed:
                self.calls.append(key)
                self.got[key] = outcome
                self._changed.notify_all()

        return done

    def wait(self, keys, timeout=60.0):
        with self._changed:
            assert self._changed.wait_for(lambda: set(keys) <= set(self.got), timeout), (
                f"no outcome for {set(keys) - set(self.got)} within {timeout} s"
            )
        return [self.got[k] for k in keys]


def _job(labels, seed, guidance=0.0, classifier=0.0, sampler="ddim", steps=4):
    return SampleJob(tuple(labels), guidance, classifier, sampler, steps, 0.0, seed)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to ±2 levels on at most 1% of the pixels (serving.sampler's tolerance)."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return a.shape == b.shape and diff.max() <= 2 and (diff > 0).mean() <= 0.01


def _in_this_process(model, jobs) -> list[np.ndarray]:
    scheduler, got = StepScheduler(), Outcomes()
    for i, job in enumerate(jobs):
        scheduler.submit(model, job, got(i))
    while scheduler.step():
        pass
    return [outcome.images for outcome in got.wait(range(len(jobs)))]


MIX = [
    _job([3, 3], seed=1, guidance=3.0),
    _job([1], seed=2),
    _job([7, 2], seed=3, classifier=1.0, steps=6),
    _job([4], seed=4, sampler="ddpm", steps=3),
    _job([6, 8], seed=6, sampler="dpmpp_2m", steps=5, guidance=1.5),
]


def test_the_engine_process_samples_what_the_scheduler_samples_here(engine, model):
    got = Outcomes()
    for i, job in enumerate(MIX):
        engine.submit(model, job, got(i))
    outcomes = got.wait(range(len(MIX)))
    expected = _in_this_process(model, MIX)
    for i, (outcome, want) in enumerate(zip(outcomes, expected, strict=True)):
        assert isinstance(outcome, SampleResult), outcome
        assert _close(outcome.images, want), f"request {i} differs from the in-process run"
        assert outcome.report.forwards == MIX[i].steps
    assert sorted(got.calls) == list(range(len(MIX)))  # each answered once
    assert engine.stats.requests >= len(MIX)
    assert engine.stats.images >= sum(len(j.labels) for j in MIX)
    assert engine.stats.forwards >= max(j.steps for j in MIX)


def test_two_model_versions_each_sample_with_their_own_weights(engine, model):
    other = _model(1)
    job = _job([5, 2], seed=9, guidance=2.0)
    got = Outcomes()
    engine.submit(model, job, got("old"))
    engine.preload(other)  # as when the alias moves
    engine.submit(other, job, got("new"))
    old, new = got.wait(["old", "new"])
    assert _close(old.images, _in_this_process(model, [job])[0])
    assert _close(new.images, _in_this_process(other, [job])[0])
    assert not _close(old.images, new.images)  # different weights, different images
    # The old version is forgotten once nothing uses it; requests for it still work.
    engine.submit(model, job, got("old again"))
    (again,) = got.wait(["old again"])
    assert np.array_equal(again.images, old.images)


def test_a_cancelled_request_is_never_answered_and_frees_its_rows(engine, model):
    got = Outcomes()
    ticket = engine.submit(model, _job(list(range(10)) * 6, seed=3, steps=100), got("long"))
    deadline = time.monotonic() + 30
    while engine.active_rows < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active_rows == 60
    cancelled = engine.stats.cancelled
    engine.cancel(ticket)
    engine.submit(model, _job([1], seed=1), got("after"))
    got.wait(["after"])
    deadline = time.monotonic() + 10
    while engine.stats.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats.cancelled == cancelled + 1
    time.sleep(0.2)
    assert "long" not in got.got
    assert engine.active_rows == 0


def test_a_request_the_model_cannot_sample_fails_alone(engine, model):
    got = Outcomes()
    engine.submit(model, _job([1], seed=1, steps=10_000), got("impossible"))
    engine.submit(model, _job([2], seed=2), got("fine"))
    impossible, fine = got.wait(["impossible", "fine"])
    assert isinstance(impossible, SampleFailure) and not impossible.retryable
    assert "steps must be between 1 and 100" in impossible.message
    assert isinstance(fine, SampleResult)
    assert engine.is_alive()


def test_the_work_that_waits_is_reported_for_autoscaling(model):
    engine = EngineProcess(
        EngineSettings(
            max_rows_per_forward=4, join_running=True, autocast="off", torch_threads=1, device="cpu"
        ),
        after_step=lambda e: seen.append(e.network_rows()),
    )
    seen: list[tuple[int, int]] = []
    try:
        got = Outcomes()
        engine.submit(model, _job([0, 1, 2, 3, 4, 5], seed=1, guidance=3.0, steps=20), got(0))
        (outcome,) = got.wait([0])
        assert isinstance(outcome, SampleResult)
    finally:
        engine.close()
    # Two rows with guidance fill the forward of 4 network rows; 4 images (8 rows) wait.
    assert (4, 8) in seen
    assert max(active for active, _ in seen) <= 4
    assert seen[-1][1] == 0


def test_a_killed_engine_fails_what_was_pending_and_reports_itself_dead(model):
    engine = EngineProcess(SETTINGS)
    got = Outcomes()
    engine.submit(model, _job(list(range(10)) * 6, seed=1, steps=100), got("pending"))
    deadline = time.monotonic() + 30
    while engine.active_rows == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(engine._process.pid, signal.SIGKILL)
    (outcome,) = got.wait(["pending"], timeout=15)
    assert isinstance(outcome, SampleFailure) and outcome.retryable
    assert "engine of this replica stopped" in outcome.message
    assert not engine.is_alive()
    engine.submit(model, _job([1], seed=1), got("after"))  # answered at once, not hung
    (after,) = got.wait(["after"], timeout=1)
    assert isinstance(after, SampleFailure) and after.retryable
    engine.close()


REPLICA = """
import sys, time
from serving.engine import EngineProcess, EngineSettings
engine = EngineProcess(EngineSettings(8, True, "off", 1, "cpu"))
print(engine._process.pid, flush=True)
time.sleep(600)
"""


def test_the_engine_exits_when_its_replica_is_killed():
    replica = subprocess.Popen([sys.executable, "-c", REPLICA], stdout=subprocess.PIPE, text=True)
    try:
        engine_pid = int(replica.stdout.readline())
        os.kill(replica.pid, signal.SIGKILL)
        replica.wait(10)
        deadline = time.monotonic() + 20
        while _running(engine_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(engine_pid), "the engine outlived its replica"
    finally:
        replica.kill()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_the_thread_engine_offers_the_same_interface(model):
    engine = start_engine(
        EngineSettings(64, True, "off", 1, "cpu", process=False),
    )
    try:
        got = Outcomes()
        engine.preload(model)
        engine.submit(model, MIX[0], got(0))
        (outcome,) = got.wait([0])
        assert _close(outcome.images, _in_this_process(model, [MIX[0]])[0])
        assert engine.is_alive()
    finally:
        engine.close()
    assert not engine.is_alive()


def test_the_engine_settings_reach_the_scheduler(model):
    """Both engines build their scheduler from scheduler_options; with batch_invariant
    every forward of the thread engine runs at the full width."""
    settings = EngineSettings(
        16, True, "off", 1, "cpu", process=False, batch_invariant=True, decode_width=8
    )
    assert scheduler_options(settings) == {
        "max_rows_per_forward": 16,
        "join_running": True,
        "autocast": None,
        "batch_invariant": True,
        "cuda_graph": False,
        "decode_width": 8,
    }
    engine = start_engine(settings)
    try:
        assert engine.batch_invariant and engine.max_rows_per_forward == 16
        assert engine.decode_width == 8
        got = Outcomes()
        engine.submit(model, MIX[1], got(0))
        (outcome,) = got.wait([0])
        assert outcome.report.mean_rows_per_forward == 1  # the real rows; 16 computed
        assert _close(outcome.images, _in_this_process(model, [MIX[1]])[0])
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("setting", "device", "native_bf16", "expected"),
    [
        ("auto", "cpu", True, torch.bfloat16),  # oneDNN's native bf16 path
        ("auto", "cpu", False, None),  # emulated bf16 would be slower: float32
        ("auto", "cuda", True, None),  # measured slower on a GPU for these networks
        ("off", "cpu", True, None),
        ("bf16", "cpu", False, torch.bfloat16),  # asked for: given
        ("fp16", "cuda", False, torch.float16),
    ],
)
def test_auto_autocast_is_bf16_only_on_a_cpu_that_computes_it_natively(
    monkeypatch, setting, device, native_bf16, expected
):
    import serving.engine

    monkeypatch.setattr(serving.engine, "cpu_has_native_bf16", lambda: native_bf16)
    settings = EngineSettings(16, True, setting, 1, device)
    assert settings.autocast_dtype is expected
    assert scheduler_options(settings)["autocast"] is expected


CONFIGURE = """
import json, os, torch
from serving.engine import EngineSettings, configure_torch
configure_torch(EngineSettings(8, True, "off", 2, {device!r}, deterministic={deterministic}))
print(json.dumps([
    torch.get_num_threads(),
    torch.are_deterministic_algorithms_enabled(),
    torch.backends.cudnn.allow_tf32,
    torch.backends.cudnn.deterministic,
    os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    torch.utils.deterministic.fill_uninitialized_memory,
]))
"""


@pytest.mark.parametrize(
    ("device", "deterministic", "expected"),
    [
        ("cuda", True, [2, True, False, True, ":4096:8", False]),
        ("cuda", False, [2, False, True, False, None, True]),
        ("cpu", True, [2, False, True, False, None, True]),  # CPU kernels left as they are
    ],
)
def test_configure_torch_sets_deterministic_gpu_kernels(device, deterministic, expected):
    """In a fresh process (the settings are process-wide); setting the flags needs no GPU."""
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    code = CONFIGURE.format(device=device, deterministic=deterministic)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == expected


WIDTHS = """
import time, torch
from serving.engine import EngineSettings, configure_torch
configure_torch(EngineSettings(8, True, "off", 1, "cpu"))
conv = torch.nn.Conv2d(4, 8, 3, padding=1)
for sweep in range(2):
    print(time.time() * 1000, flush=True)  # the clock oneDNN stamps its lines with
    with torch.no_grad():
        for width in range(1, 701):
            conv(torch.zeros(width, 4, 4, 4))
"""


def _kernels_built(log: str) -> list[list[str]]:
    """oneDNN's kernel builds ("cache_miss" or "cache_hit") in each sweep of WIDTHS's
    output, told apart by their time stamps (oneDNN's own output is buffered apart
    from Python's)."""
    lines = log.splitlines()
    starts = [float(line) for line in lines if not line.startswith("onednn_verbose")]
    sweeps: list[list[str]] = [[] for _ in starts]
    for line in lines:
        fields = line.split(",")
        if len(fields) > 4 and fields[4].startswith("create:"):
            stamp = float(fields[2])
            sweeps[sum(stamp >= start for start in starts) - 1].append(fields[4][7:])
    return sweeps


@pytest.mark.parametrize(("capacity", "rebuilt"), [(None, False), ("1024", True)])
def test_a_cpu_engine_keeps_the_kernels_of_every_width_it_ran(capacity, rebuilt):
    """A convolution at 700 widths takes more oneDNN kernels than its default cache
    holds (1,024): run twice, the engine's second sweep builds none anew (oneDNN logs
    each kernel it builds, found in its cache or not); a capacity set in the
    environment is left as it is, and then the second sweep rebuilds at least one
    kernel of every width."""
    env = os.environ | {"ONEDNN_VERBOSE": "profile_create", "ONEDNN_VERBOSE_TIMESTAMP": "1"}
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    if capacity is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = capacity
    out = subprocess.run(
        [sys.executable, "-c", WIDTHS], env=env, capture_output=True, text=True, check=True
    ).stdout
    first, second = _kernels_built(out)
    assert first.count("cache_miss") > 1024
    assert len(second) == len(first)
    rebuilt_kernels = second.count("cache_miss")
    assert rebuilt_kernels >= 700 if rebuilt else rebuilt_kernels == 0  # ≥ one a width
