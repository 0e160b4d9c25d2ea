"""Logging to an MLflow run that survives the tracking server being down for minutes.

:class:`RunTracker` (rank 0 of a training stage, the evaluation) never makes the
caller wait on MLflow: metrics and images go into a bounded buffer that a
background thread sends in order. While the server does not answer, the thread
retries with backoff and keeps everything; once it answers, the backlog goes out with
each metric's original timestamp and step. Only an outage longer than the budget, or
an error that retrying cannot fix (a deleted run, a rejected value), is raised: at the
next log call or at :meth:`RunTracker.close`.

:meth:`RunTracker.log_checkpoint` uploads a checkpoint folder as run artifacts the same
way, except that one which still cannot be sent after the budget is given up with a
warning instead of failing the run (training has it in its storage either way).

:func:`retry_tracking` does the same for one call of the driver (creating the run,
registering the model, finishing the run).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from data.environment import redact
from training.mlflow.checkpoint_artifacts import prune_checkpoints

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_OUTAGE_BUDGET_S = 1800.0
MAX_BUFFERED_METRICS = 100_000
MAX_BUFFERED_IMAGES = 32
MAX_BUFFERED_CHECKPOINTS = 2  # beyond it the oldest waiting one is skipped
# At close, checkpoint uploads get this long once everything else is sent: a stage does
# not wait out an outage for them (its checkpoints are in storage; the driver logs the
# final ones, see training.mlflow.checkpoint_artifacts).
CHECKPOINT_GRACE_S = 30.0
BATCH_LIMIT = 1000  # metrics per log_batch call (MLflow's own limit)
SYSTEM_METRICS_INTERVAL_S = 10.0
SYSTEM_METRICS_FINISH_S = 15.0
# Errors that say the request itself is wrong: waiting for the server cannot help.
_PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "BAD_REQUEST",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "INVALID_STATE",
    "RESOURCE_ALREADY_EXISTS",
}


class TrackingUnavailable(RuntimeError):
    """MLflow stayed unreachable longer than the outage budget, or refused a request."""


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` may go away when the tracking server is back."""
    if isinstance(error, MlflowException):
        return error.error_code not in _PERMANENT_CODES
    return isinstance(error, OSError | ConnectionError | TimeoutError) or type(
        error
    ).__module__.startswith(("requests", "urllib3", "botocore"))


def retry_tracking(
    call: Callable[[], _T],
    what: str,
    budget_s: float = DEFAULT_OUTAGE_BUDGET_S,
    sleep: Callable[[float], None] = time.sleep,
) -> _T:
    """``call()``, retried with backoff (1 s doubling to 30 s) while it fails in a way
    that may be an outage, for at most ``budget_s``; ``what`` names it in messages."""
    started, delay = time.monotonic(), 1.0
    while True:
        try:
            return call()
        except Exception as error:
            waited = time.monotonic() - started
            if not is_transient(error):
                raise
            if waited + delay > budget_s:
                raise TrackingUnavailable(
                    f"{what}: the MLflow tracking server did not answer for {waited:.0f} s "
                    f"(budget {budget_s:.0f} s): {redact(str(error))[:500]}"
                ) from error
            logger.warning(
                "%s failed (%s); MLflow may be down, retrying in %.0f s",
                what,
                redact(str(error))[:200],
                delay,
            )
            sleep(delay)
            delay = min(30.0, delay * 2)


class RunTracker:
    """Logs to one existing MLflow run from a background thread (see the module doc).
    Use as a context manager, or call :meth:`close` to wait for the backlog."""

    def __init__(
        self, tracking_uri: str, run_id: str, outage_budget_s: float = DEFAULT_OUTAGE_BUDGET_S
    ):
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.outage_budget_s = outage_budget_s
        self.dropped = 0  # items dropped because the buffer was full
        self.checkpoints_sent: list[str] = []
        self.checkpoints_lost: list[str] = []  # skipped, or given up after the budget
        self._pending: deque[tuple[str, Any]] = deque()
        self._metrics = 0
        self._images = 0
        self._error: BaseException | None = None
        self._closing = False
        self._busy: str | None = None  # the kind of item being sent
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mlflow-tracker", daemon=True)
        self._thread.start()
        self._system: Any = None  # MLflow's SystemMetricsMonitor, when started

    def monitor_system(self, interval_s: float = SYSTEM_METRICS_INTERVAL_S) -> None:
        """Log this machine's CPU, memory, disk, network (and GPU) use to the run as
        ``system/…`` metrics every ``interval_s`` until :meth:`close`; steps continue
        where an earlier stage of the run left them. MLflow's monitor keeps trying
        through an outage and logs a warning instead of failing."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=interval_s,
            resume_logging=True,
            tracking_uri=self.tracking_uri,
        )
        self._system.start()

    # ----------------------------------------------------------------- the caller's side
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._put("metrics", batch, len(batch))

    def log_image(
        self,
        image: np.ndarray,
        artifact_file: str | None = None,
        *,
        key: str | None = None,
        step: int | None = None,
    ) -> None:
        """uint8 [H, W] or [H, W, C] as a PNG artifact of the run: at ``artifact_file``,
        or as step ``step`` of the image series ``key`` (the MLflow UI shows a series
        with a step slider)."""
        if (artifact_file is None) == (key is None):
            raise ValueError("give artifact_file, or key and step")
        item = (np.array(image, copy=True), artifact_file, key, step)
        self._put("image", item, 0)

    def log_checkpoint(self, folder: str | Path, artifact_path: str, keep_last: int | None) -> None:
        """Upload a copy of checkpoint ``folder`` to the run's ``artifact_path`` (e.g.
        ``checkpoints/denoiser/step-0000400``), then delete its older siblings beyond the
        ``keep_last`` newest (None: keep every one). Copied now, sent in the background."""
        staging = Path(tempfile.mkdtemp(prefix="ldm-checkpoint-"))
        shutil.copytree(folder, staging, dirs_exist_ok=True)
        with self._cv:
            waiting = [item for kind, item in self._pending if kind == "checkpoint"]
            if len(waiting) >= MAX_BUFFERED_CHECKPOINTS:  # uploads lag: skip the oldest
                oldest = waiting[0]
                self._pending.remove(("checkpoint", oldest))
                shutil.rmtree(oldest[0], ignore_errors=True)
                self.checkpoints_lost.append(oldest[1])
                logger.warning("checkpoint %s not logged to MLflow: uploads lag", oldest[1])
            self._pending.append(("checkpoint", (staging, artifact_path, keep_last)))
            self._cv.notify_all()

    def close(self, timeout_s: float | None = None) -> None:
        """Wait until everything buffered is sent (at most the outage budget, or
        ``timeout_s``); raises :class:`TrackingUnavailable` if it cannot be. Checkpoint
        uploads left when all else is sent get :data:`CHECKPOINT_GRACE_S` more, then
        are given up (never an error)."""
        if self._system is not None:  # its last sample, but no waiting out an outage for it
            finishing = threading.Thread(target=self._system.finish, daemon=True)
            finishing.start()
            finishing.join(SYSTEM_METRICS_FINISH_S)
            self._system = None
        deadline = time.monotonic() + (self.outage_budget_s if timeout_s is None else timeout_s)
        grace_ends = None
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            while (self._pending or self._busy) and self._error is None:
                if self._only_checkpoints_left():
                    grace_ends = grace_ends or time.monotonic() + CHECKPOINT_GRACE_S
                    if time.monotonic() >= min(grace_ends, deadline):
                        self._give_up_checkpoints()
                        break
                left = deadline - time.monotonic()
                if left <= 0:
                    self._error = TrackingUnavailable(
                        f"{len(self._pending)} MLflow logging calls of run {self.run_id} were "
                        "still unsent when the wait ended"
                    )
                    break
                self._cv.wait(min(left, 1.0))
            self._cv.notify_all()
        self._thread.join(5)
        self._raise_if_failed()

    def _only_checkpoints_left(self) -> bool:
        kinds = {kind for kind, _ in self._pending} | ({self._busy} if self._busy else set())
        return kinds == {"checkpoint"}

    def _give_up_checkpoints(self) -> None:
        for kind, item in list(self._pending):
            self._pending.remove((kind, item))
            shutil.rmtree(item[0], ignore_errors=True)
            self.checkpoints_lost.append(item[1])
            logger.warning("checkpoint %s not logged to MLflow before the stage ended", item[1])

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is None:
            self.close()
        else:  # already failing: do not wait out an outage on top of it
            self.close(timeout_s=10)

    def _put(self, kind: str, item: Any, metric_count: int) -> None:
        self._raise_if_failed()
        with self._cv:
            if kind == "metrics" and self._metrics + metric_count > MAX_BUFFERED_METRICS:
                self.dropped += metric_count
                return
            if kind == "image":
                if self._images >= MAX_BUFFERED_IMAGES:
                    self.dropped += 1
                    return
                self._images += 1
            self._metrics += metric_count
            self._pending.append((kind, item))
            self._cv.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise TrackingUnavailable(
                f"MLflow logging of run {self.run_id} failed: {self._error}"
            ) from self._error

    # ----------------------------------------------------------------- the sender's side
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closing:
                    self._cv.wait()
                if not self._pending:
                    return
                kind, item = self._take()
                self._busy = kind
            try:
                if kind == "checkpoint":
                    self._send_checkpoint(*item)
                else:
                    retry_tracking(
                        partial(self._send, kind, item), "MLflow logging", self.outage_budget_s
                    )
            except BaseException as error:  # handed to the caller's thread
                with self._cv:
                    self._error, self._busy = error, None
                    self._cv.notify_all()
                return
            with self._cv:
                self._busy = None
                self._cv.notify_all()

    def _take(self) -> tuple[str, Any]:
        """The oldest item; consecutive metric batches are merged into one call."""
        kind, item = self._pending.popleft()
        if kind == "metrics":
            merged = list(item)
            while self._pending and self._pending[0][0] == "metrics":
                if len(merged) + len(self._pending[0][1]) > BATCH_LIMIT:
                    break
                merged += self._pending.popleft()[1]
            self._metrics -= len(merged)
            return kind, merged
        if kind == "image":
            self._images -= 1
        return kind, item

    def _send(self, kind: str, item: Any) -> None:
        if kind == "metrics":
            self.client.log_batch(self.run_id, metrics=item)
        else:
            image, artifact_file, key, step = item
            if key is None:
                self.client.log_image(self.run_id, image, artifact_file=artifact_file)
            else:
                self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True)

    def _send_checkpoint(self, staging: Path, artifact_path: str, keep_last: int | None) -> None:
        """Upload and prune; a checkpoint that cannot be sent is lost, not the run."""
        try:
            retry_tracking(
                lambda: self.client.log_artifacts(self.run_id, str(staging), artifact_path),
                f"logging checkpoint {artifact_path}",
                self.outage_budget_s,
            )
            self.checkpoints_sent.append(artifact_path)
            if keep_last is not None:
                retry_tracking(
                    lambda: prune_checkpoints(
                        self.client, self.tracking_uri, self.run_id, artifact_path, keep_last
                    ),
                    f"pruning the checkpoints beside {artifact_path}",
                    self.outage_budget_s,
                )
        except Exception as error:
            self.checkpoints_lost.append(artifact_path)
            logger.warning(
                "checkpoint %s not logged to MLflow: %s", artifact_path, redact(str(error))[:300]
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
