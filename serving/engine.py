"""The sampling loop in a process of its own: the replica's engine.

A Serve replica runs its HTTP event loop, Serve's and Ray's threads and, with the
``thread`` engine, the :class:`~serving.scheduler.StepScheduler` loop in one
interpreter; between the network's kernels those threads take the GIL from the
sampling loop (measured on 2 cores: the sampling thread had 74% of the replica's
samples while the replica used 84% of a core). :class:`EngineProcess` runs the same
scheduler in a child process with its own interpreter, as an LLM server's engine
core is, and offers the replica the scheduler's interface: ``submit`` with a callback,
``cancel``, the row counts autoscaling reads and :class:`~serving.stats.EngineStats`.

The two talk over one socket pair with pickled messages:

- replica → engine: ``("model", key, config_json, weights)`` a model version (its
  config and safetensors bytes, sent once, before its first job), ``("forget", key)``,
  ``("submit", ticket, key, job)``, ``("cancel", ticket)``, ``("stop",)``;
- engine → replica: ``("done", ticket, outcome)`` (uint8 images or a failure) and
  ``("status", step)`` after every step and whenever the queue changed.

The engine imports no Ray. It exits when the replica's end of the socket closes, so
a replica killed with SIGKILL leaves no engine behind; if the engine dies, every
pending request fails with a 500 and the replica reports itself unhealthy.

Run as ``python -m serving.engine FD`` by :class:`EngineProcess`, never by hand.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from serving.sampler import SampleFailure, SampleJob, SampleResult
from serving.scheduler import DECODE_WIDTH, StepScheduler
from serving.stats import EngineStats
from training.latent_diffusion import LatentDiffusion
from training.optimisation import cpu_has_native_bf16

Outcome = SampleResult | SampleFailure
logger = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
# oneDNN, which runs torch's CPU convolutions and bf16 matmuls, keeps the kernels it
# builds for each shape in a cache of 1,024 by default. An engine's forwards change
# width from step to step (any number of rows up to max_rows_per_forward, any decode
# width): the demo network alone used 2,227 of them in two minutes of the mixed load.
# At the default the cache evicted and rebuilt kernels all the time, and a replica
# served fewer images/s the longer it ran (benchmarks/RESULTS.md, "oneDNN's kernel
# cache"); this holds every width of a network several times the demo's size.
ONEDNN_CACHE_CAPACITY = 16384
ENGINE_STOPPED = "the sampling engine of this replica stopped"


@dataclass(frozen=True)
class EngineSettings:
    """How the engine samples: the scheduler's settings and the process's torch."""

    max_rows_per_forward: int
    join_running: bool
    autocast: str  # "auto", "off", "bf16" or "fp16" (see resolve_autocast)
    torch_threads: int
    device: str  # where the engine moves each model version it receives
    process: bool = True  # False: a thread of the replica (ThreadEngine)
    batch_invariant: bool = False  # every network call at max_rows_per_forward rows
    cuda_graph: bool = False  # with batch_invariant on a GPU: denoiser and decoder as graphs
    deterministic: bool = True  # deterministic GPU kernels, float32 without TF32
    decode_width: int = DECODE_WIDTH  # images per decoder call

    @property
    def autocast_dtype(self) -> Any:  # torch.dtype | None
        import torch

        cast = resolve_autocast(self.autocast, self.device)
        return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cast]


def resolve_autocast(setting: str, device: str) -> str:
    """The networks' precision on ``device`` of this machine. ``auto``: bf16 on a CPU
    that computes it natively (oneDNN's AVX512-BF16 or AMX path; the demo model served
    1.34–1.46× the images/s at 32 requests, with the same evaluator scores), float32
    on other CPUs, where bf16 is emulated, and on a GPU, where bf16 measured slower for
    these networks (benchmarks/RESULTS.md)."""
    if setting != "auto":
        return setting
    return "bf16" if device == "cpu" and cpu_has_native_bf16() else "off"


def scheduler_options(settings: EngineSettings) -> dict[str, Any]:
    """The :class:`~serving.scheduler.StepScheduler` arguments of ``settings``."""
    return {
        "max_rows_per_forward": settings.max_rows_per_forward,
        "join_running": settings.join_running,
        "autocast": settings.autocast_dtype,
        "batch_invariant": settings.batch_invariant,
        "cuda_graph": settings.cuda_graph,
        "decode_width": settings.decode_width,
    }


def configure_torch(settings: EngineSettings) -> None:
    """Set this process's torch for sampling: its threads and, when ``deterministic``,
    kernels that give the same result every run. On a GPU that means cuDNN's and
    cuBLAS's deterministic algorithms and full float32 (no TF32, whose 10-bit
    mantissa turns the kernel's choice of summation order into visible pixel changes).
    Process-wide: the engine's process, or the replica's with the thread engine. A CPU
    engine keeps its kernels, which already repeat themselves run to run, and gets a
    oneDNN kernel cache that holds every width it runs (``ONEDNN_CACHE_CAPACITY``;
    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` in the environment wins). oneDNN reads that when
    it builds its first kernel, so this runs before any network does."""
    if settings.device == "cpu":
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
    torch.set_num_threads(settings.torch_threads)
    if not settings.deterministic or settings.device != "cuda":
        return
    # cuBLAS reads this when it first creates a handle, i.e. before the first matmul.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    # An op without a deterministic kernel warns instead of failing its request.
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN, a kernel per allocation
    # that catches reads of uninitialised memory; sampling writes what it allocates.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]


def start_engine(
    settings: EngineSettings, after_step: Callable[[Any], None] | None = None
) -> EngineProcess | ThreadEngine:
    """The replica's sampling engine, running: a child process or a thread."""
    if settings.process:
        return EngineProcess(settings, after_step)
    return ThreadEngine(settings, after_step).start()


@dataclass(frozen=True)
class StepStatus:
    """The engine after a step (``rows`` 0: no step, the queue changed)."""

    rows: int
    step_s: float
    active_rows: int
    waiting_rows: int
    active_network_rows: int
    waiting_network_rows: int
    cancelled: int  # requests dropped so far


@dataclass
class _Pending:
    on_done: Callable[[Outcome], None]
    key: int


class EngineProcess:
    """A :class:`~serving.scheduler.StepScheduler` in a child process (see the module
    docstring). ``after_step`` is called with this object after every step the engine
    reports, from the thread that reads the engine's messages."""

    def __init__(
        self,
        settings: EngineSettings,
        after_step: Callable[[EngineProcess], None] | None = None,
    ):
        self.after_step = after_step
        self.stats = EngineStats()
        self._status = StepStatus(0, 0.0, 0, 0, 0, 0, 0)
        # Whoever sends holds _send_lock (taken first), the tables are under _lock; the
        # reader thread takes only _lock and never sends, so a send blocked on a full
        # socket cannot stop the reader from draining the engine's answers.
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._keys: dict[int, tuple[int, Any]] = {}  # id(model) -> (key, model), held
        self._next_ticket = 0
        self._next_key = 0
        self._closed = False
        ours, theirs = socket.socketpair()
        env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "serving.engine", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send(settings)
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ the scheduler's interface
    def preload(self, model: Any) -> None:
        """Send ``model`` to the engine now (e.g. when the alias moved), so that its
        first request does not wait for the transfer."""
        with self._send_lock:
            with self._lock:
                if self._closed:
                    return
                key, new = self._key_for(model)
            if new:
                self._send_quietly(("model", key, *model.to_bytes()))

    def submit(self, model: Any, job: SampleJob, on_done: Callable[[Outcome], None]) -> int:
        """Queue ``job`` for ``model``; ``on_done`` is called once, from the reader thread.
        Returns the ticket to :meth:`cancel` it with."""
        with self._send_lock:
            with self._lock:
                ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
                closed = self._closed
                if not closed:
                    key, new = self._key_for(model)
                    self._pending[ticket] = _Pending(on_done, key)
                    idle = self._idle_keys()
            if closed:
                failure = SampleFailure(ENGINE_STOPPED, retryable=True)
                self._deliver(on_done, failure)
                return ticket
            if new:
                self._send_quietly(("model", key, *model.to_bytes()))
            self._send_quietly(("submit", ticket, key, job))
            for old in idle:
                self._send_quietly(("forget", old))
        return ticket

    def cancel(self, ticket: int) -> None:
        """Stop sampling ``ticket`` at the engine's next step; ``on_done`` is not called."""
        with self._send_lock:
            with self._lock:
                known = self._pending.pop(ticket, None) is not None
            if known:
                self._send_quietly(("cancel", ticket))

    @property
    def waiting_rows(self) -> int:
        return self._status.waiting_rows

    @property
    def active_rows(self) -> int:
        return self._status.active_rows

    def network_rows(self) -> tuple[int, int]:
        status = self._status
        return status.active_network_rows, status.waiting_network_rows

    @property
    def pid(self) -> int:
        """The engine process's id."""
        return self._process.pid

    def is_alive(self) -> bool:
        return self._process.poll() is None and self._reader.is_alive()

    def close(self) -> None:
        """Stop the engine: it finishes nothing more; pending requests fail."""
        with self._send_lock:
            self._send_quietly(("stop",))
        try:
            self._process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join(STOP_GRACE_S)

    # ------------------------------------------------------------------ the engine's answers
    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "done":
                    self._answered(message[1], message[2])
                elif message[0] == "status":
                    self._stepped(message[1])
        except (EOFError, OSError):
            pass  # the engine exited or was killed
        except Exception:
            logger.exception("cannot read the sampling engine's messages; stopping it")
        finally:
            self._stopped()

    def _answered(self, ticket: int, outcome: Outcome) -> None:
        with self._lock:
            pending = self._pending.pop(ticket, None)
        if pending is None:
            return  # cancelled meanwhile
        if isinstance(outcome, SampleResult):
            self.stats.record_answer(len(outcome.images))
        else:
            self.stats.failed += 1
        self._deliver(pending.on_done, outcome)

    def _stepped(self, status: StepStatus) -> None:
        self._status = status
        self.stats.cancelled = status.cancelled
        if status.rows:
            self.stats.record_step(status.rows, status.step_s)
            if self.after_step is not None:
                try:
                    self.after_step(self)
                except Exception:
                    logger.exception("after_step failed")

    def _stopped(self) -> None:
        """The engine is gone: every request still waiting fails (a 500, not a hang)."""
        try:
            code = self._process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            code = None  # its socket closed, but the process lives on: stop it
            self._process.kill()
        with self._lock:
            self._closed = True
            pending, self._pending = list(self._pending.values()), {}
            self._keys.clear()
        if pending:
            logger.error("the sampling engine stopped (exit code %s)", code)
        for item in pending:
            self.stats.failed += 1
            failure = SampleFailure(f"{ENGINE_STOPPED} (exit code {code})", retryable=True)
            self._deliver(item.on_done, failure)

    # ------------------------------------------------------------------ helpers
    def _key_for(self, model: Any) -> tuple[int, bool]:
        """The engine's key of ``model`` and whether it is new (``_lock`` held)."""
        known = self._keys.get(id(model))
        if known is not None:
            return known[0], False
        key, self._next_key = self._next_key, self._next_key + 1
        self._keys[id(model)] = (key, model)  # held, so that its id is not reused
        return key, True

    def _idle_keys(self) -> list[int]:
        """Versions no pending request uses, except the newest: the engine may drop
        them (``_lock`` held; they are removed from the table)."""
        busy = {p.key for p in self._pending.values()}
        newest = max((key for key, _ in self._keys.values()), default=None)
        idle = []
        for model_id, (key, _) in list(self._keys.items()):
            if key not in busy and key != newest:
                del self._keys[model_id]
                idle.append(key)
        return idle

    def _send_quietly(self, message: tuple) -> None:
        with contextlib.suppress(OSError):  # the engine is gone: the reader fails the rest
            self._conn.send(message)

    @staticmethod
    def _deliver(on_done: Callable[[Outcome], None], outcome: Outcome) -> None:
        try:
            on_done(outcome)
        except Exception:
            logger.exception("could not deliver the outcome of a request")


class ThreadEngine(StepScheduler):
    """The scheduler's loop in a thread of the replica (``engine: thread``), with the
    same interface as :class:`EngineProcess`."""

    def __init__(self, settings: EngineSettings, after_step: Callable[[Any], None] | None = None):
        super().__init__(after_step=after_step, **scheduler_options(settings))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self.run, args=(self._stop,), name="sampler", daemon=True
        )

    def start(self) -> ThreadEngine:
        self._thread.start()
        return self

    def preload(self, model: Any) -> None:
        """Nothing to do: the thread shares the replica's models."""

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self.wake()
        self._thread.join(STOP_GRACE_S)


# ---------------------------------------------------------------------- the engine itself
def serve_engine(conn: Connection) -> None:
    """The engine's loop: receive work between steps, step, report; return at EOF or stop."""
    settings: EngineSettings = conn.recv()
    configure_torch(settings)
    scheduler = StepScheduler(**scheduler_options(settings))
    models: dict[int, Any] = {}
    tickets: dict[int, Any] = {}

    def answer(ticket: int) -> Callable[[Outcome], None]:
        def on_done(outcome: Outcome) -> None:
            tickets.pop(ticket, None)
            conn.send(("done", ticket, outcome))

        return on_done

    def status(rows: int, step_s: float) -> StepStatus:
        active, waiting = scheduler.network_rows()
        return StepStatus(
            rows,
            step_s,
            scheduler.active_rows,
            scheduler.waiting_rows,
            active,
            waiting,
            scheduler.stats.cancelled,
        )

    while True:
        busy = scheduler.active_rows > 0 or scheduler.waiting_rows > 0
        timeout, changed = (0.0 if busy else None), False
        while conn.poll(timeout):
            message = conn.recv()
            kind = message[0]
            if kind == "stop":
                return
            if kind == "model":
                _, key, config_json, weights = message
                models[key] = LatentDiffusion.from_bytes(config_json, weights, settings.device)
            elif kind == "forget":
                models.pop(message[1], None)
            elif kind == "submit":
                _, ticket, key, job = message
                if key in models:
                    tickets[ticket] = scheduler.submit(models[key], job, answer(ticket))
                else:
                    answer(ticket)(SampleFailure(f"the engine has no model {key}"))
            elif kind == "cancel" and message[1] in tickets:
                scheduler.cancel(tickets.pop(message[1]))
            changed, timeout = True, 0.0
        if scheduler.step():
            conn.send(("status", status(scheduler.stats.last_rows, scheduler.stats.last_step_s)))
        elif changed:
            conn.send(("status", status(0, 0.0)))


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    conn = Connection(int(argv[0]))
    with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):
        serve_engine(conn)  # those: the replica is gone


if __name__ == "__main__":
    # Run the imported module's main, so that what the engine pickles names
    # serving.engine.StepStatus, not __main__.StepStatus.
    from serving.engine import main as engine_main

    engine_main(sys.argv[1:])
