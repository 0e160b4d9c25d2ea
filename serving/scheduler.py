"""Step-level scheduling: every denoising step is one network forward over all the
images being sampled, whatever their request's sampler, step count, guidance or
position in its chain.

A request becomes one *row* per image. A row carries its own chain (the respaced
diffusion of its step count), its position in it, its sampler and η, its guidance
scales, its generator and, for DPM-Solver++, the x̂_0 of its previous step. At each
step boundary :meth:`StepScheduler.step`

1. drops the rows of cancelled requests (the client left or timed out),
2. admits waiting rows, oldest request first, while the forward has room
   (``max_rows_per_forward`` counts network rows: a row with classifier-free
   guidance counts twice, for its conditional and its null pass),
3. runs one forward per model version over the active rows (the conditional pass of
   every row, the null pass of rows with w > 0, the classifier's gradient for rows
   with s > 0; see :func:`training.diffusion.guided_eps`),
4. moves each row one step along *its* chain (:mod:`training.diffusion`'s per-row
   updates, each row reading its own chain's coefficients), and
5. answers the requests whose rows are all done, each request's images decoded
   together, ``decode_width`` images per call (batch invariant: the images of every
   request that finishes at this step together, one call instead of one per request
   when many finish at once, as under uniform load).

A row's noise comes only from its own generator, in its own order (x_T, then one draw
per step where its sampler needs one), so an image is the same whether it ran alone,
in a mix or joined mid-chain, up to the arithmetic tolerance stated in
:mod:`serving.sampler`. Admission is first come, first served at row granularity: a
long request cannot hold back requests behind it for longer than its rows occupy the
forward, and a short request never waits for a running chain to end.

With ``batch_invariant`` every network call runs at exactly ``max_rows_per_forward``
rows and every decode at exactly ``decode_width`` images
(:class:`~serving.forward.FixedWidth` pads them), so no kernel ever sees another
batch size and an image's arithmetic cannot depend on what shares its forward or its
decode (which is why only then do requests share a decode): on a GPU, whose kernels
change with the batch width, that makes mixed and joining images equal to the same
request alone, at the price of always computing a full forward. With ``cuda_graph``
too, the denoiser and the decoder are each recorded as a CUDA graph at their one
width, per model version, and replayed.

Plain Python and torch, no Ray: the Serve replica feeds it from its event loop and
runs :meth:`StepScheduler.run` in one thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from serving.forward import CudaGraphed, FixedWidth, LatentDecoder
from serving.sampler import (
    RequestReport,
    SampleFailure,
    SampleJob,
    SampleResult,
    image_generator,
)
from serving.stats import EngineStats
from training.diffusion import GaussianDiffusion, guided_eps
from training.diffusion.exposure import epsilon_scale, scale_eps
from training.diffusion.gaussian_diffusion import (
    Coefficients,
    ddim_update,
    ddpm_update,
    dpmpp_2m_update,
)
from training.images import to_uint8
from training.latent_diffusion import LatentDiffusion

Outcome = SampleResult | SampleFailure
DECODE_WIDTH = 32  # images per decoder call (the padded width when batch invariant)
logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Ticket:
    """A request inside the scheduler, until ``on_done`` is called with its outcome."""

    model: LatentDiffusion
    job: SampleJob
    on_done: Callable[[Outcome], None]
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    admitted: int = 0  # images given a row so far
    latents: dict[int, Tensor] = field(default_factory=dict)  # finished images
    first_admitted: float | None = None
    forwards: int = 0
    rows_seen: int = 0  # sum over its forwards of the rows in that forward
    max_rows: int = 0
    max_requests: int = 0

    @property
    def row_cost(self) -> int:
        """Network rows one image of this request takes per forward."""
        return 2 if self.job.guidance_scale > 0 else 1


@dataclass(eq=False)
class Row:
    """One image on its way along its chain; ``position`` counts down to 0, then −1 (done)."""

    ticket: Ticket
    image: int
    chain: GaussianDiffusion
    position: int
    x: Tensor  # [C, h, w] latent at its current step
    generator: torch.Generator
    x0_previous: Tensor  # DPM-Solver++'s history


def _deliver(ticket: Ticket, outcome: Outcome) -> None:
    """Hand ``outcome`` to its request; a failing callback never stops the sampling loop."""
    try:
        ticket.on_done(outcome)
    except Exception:
        logger.exception("could not deliver the outcome of a request")


def _row_coefficients(rows: Sequence[Row], like: Tensor) -> Coefficients:
    """Each row's value of a per-step table, read from its own chain at its own step."""

    def lookup(name: str) -> Tensor:
        values = np.array([getattr(r.chain, name)[r.position] for r in rows], dtype=np.float64)
        out = torch.from_numpy(values).to(like.device).to(like.dtype)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    return lookup


def _noise(rows: Sequence[Row], like: Tensor, draws: Sequence[bool]) -> Tensor:
    """One standard normal draw from each row's generator where ``draws``, zeros
    elsewhere: drawn on the host (the generators' device) and moved in one copy."""
    shape = tuple(like.shape[1:])
    zeros = torch.zeros(shape)
    host = [
        torch.randn(shape, generator=row.generator) if draw else zeros
        for row, draw in zip(rows, draws, strict=True)
    ]
    return torch.stack(host).to(like)


class StepScheduler:
    """The sampling loop of one replica (see the module docstring).

    ``max_rows_per_forward`` bounds the network batch (memory and step time).
    ``join_running=False`` admits new rows only when no chain is running, so a batch
    runs to its longest chain before the next one starts: the request-level batching
    that step-level scheduling replaces, kept for comparison in the benchmark.
    ``after_step`` is called with the scheduler after every step, from its thread.
    ``decode_width`` bounds the images per decoder call. ``batch_invariant`` pads every
    network call to ``max_rows_per_forward`` rows and every decode to ``decode_width``
    images, and decodes the requests that finish at one step together (see the module
    docstring); with it, ``cuda_graph`` replays the denoiser's forward and the decode
    as CUDA graphs recorded at those widths, for each model version on a CUDA device.
    """

    def __init__(
        self,
        max_rows_per_forward: int = 64,
        join_running: bool = True,
        after_step: Callable[[StepScheduler], None] | None = None,
        autocast: torch.dtype | None = None,
        batch_invariant: bool = False,
        cuda_graph: bool = False,
        decode_width: int = DECODE_WIDTH,
    ):
        if max_rows_per_forward < 1:
            raise ValueError(f"max_rows_per_forward must be >= 1, got {max_rows_per_forward}")
        if decode_width < 1:
            raise ValueError(f"decode_width must be >= 1, got {decode_width}")
        if cuda_graph and not batch_invariant:
            raise ValueError("cuda_graph needs batch_invariant: a graph is recorded at one width")
        self.max_rows_per_forward = max_rows_per_forward
        self.join_running = join_running
        # The networks' forward under autocast to this dtype (bf16/fp16 on a GPU); the
        # guidance combination and the samplers' updates stay float32.
        self.autocast = autocast
        self.batch_invariant = batch_invariant
        self.cuda_graph = cuda_graph
        self.decode_width = decode_width
        self.after_step = after_step  # e.g. metrics, called from the sampling thread
        self.stats = EngineStats()
        self._waiting: deque[Ticket] = deque()
        self._active: list[Row] = []
        self._diffusions: dict[int, tuple[LatentDiffusion, GaussianDiffusion]] = {}
        self._networks: dict[int, tuple[LatentDiffusion, nn.Module, nn.Module | None, nn.Module]]
        self._networks = {}
        self._wakeup = threading.Condition()

    # ------------------------------------------------------------------ feeding it
    def submit(
        self, model: LatentDiffusion, job: SampleJob, on_done: Callable[[Outcome], None]
    ) -> Ticket:
        """Queue ``job`` for ``model``; ``on_done`` is called once, from the sampling thread."""
        ticket = Ticket(model, job, on_done)
        with self._wakeup:
            self._waiting.append(ticket)
            self._wakeup.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop sampling ``ticket`` at the next step boundary; ``on_done`` is not called."""
        ticket.cancelled = True

    @property
    def waiting_rows(self) -> int:
        """Images of queued requests that have no row yet."""
        with self._wakeup:
            return sum(len(t.job.labels) - t.admitted for t in self._waiting if not t.cancelled)

    @property
    def active_rows(self) -> int:
        return len(self._active)

    def network_rows(self) -> tuple[int, int]:
        """Network rows per forward of the active images and of the waiting ones (an
        image with classifier-free guidance takes two): the work autoscaling sees."""
        with self._wakeup:
            active = sum(r.ticket.row_cost for r in self._active)
            waiting = sum(
                (len(t.job.labels) - t.admitted) * t.row_cost
                for t in self._waiting
                if not t.cancelled
            )
        return active, waiting

    def run(self, stop: threading.Event) -> None:
        """Step until ``stop`` is set, sleeping while there is nothing to sample."""
        while not stop.is_set():
            if not self.step():
                with self._wakeup:
                    if not self._waiting:
                        self._wakeup.wait(timeout=0.5)

    def wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    # ------------------------------------------------------------------ one step
    def step(self) -> bool:
        """Admit, advance every active row by one step, answer what finished.
        Returns False when there was nothing to do."""
        with self._wakeup:
            self._drop_cancelled()
            self._admit()
            rows = list(self._active)
        if not rows:
            return False
        started = time.perf_counter()
        self._account(rows)
        by_model: dict[int, list[Row]] = {}
        for row in rows:
            by_model.setdefault(id(row.ticket.model), []).append(row)
        for group in by_model.values():
            self._advance_or_isolate(group)
        self._finish([r for r in rows if r.position < 0 and not r.ticket.cancelled])
        self.stats.record_step(len(rows), time.perf_counter() - started)
        if self.after_step is not None:
            self.after_step(self)
        return True

    def _drop_cancelled(self) -> None:
        dropped = {id(t) for t in self._waiting if t.cancelled}
        dropped |= {id(r.ticket) for r in self._active if r.ticket.cancelled}
        if dropped:
            self._waiting = deque(t for t in self._waiting if not t.cancelled)
            self._active = [r for r in self._active if not r.ticket.cancelled]
            self.stats.cancelled += len(dropped)

    def _admit(self) -> None:
        """Give waiting images rows, oldest request first, while the forward has room."""
        if not self.join_running and self._active:
            return
        room = self.max_rows_per_forward - sum(r.ticket.row_cost for r in self._active)
        while self._waiting:
            ticket = self._waiting[0]
            if ticket.row_cost > room and self._active:
                return  # first come, first served: nobody overtakes the head
            try:
                row = self._new_row(ticket, ticket.admitted)
            except Exception as error:  # e.g. steps the model cannot do: this request fails
                self._waiting.popleft()
                self._active = [r for r in self._active if r.ticket is not ticket]
                self.stats.failed += 1
                ticket.cancelled = True
                _deliver(ticket, SampleFailure(f"sampling failed: {type(error).__name__}: {error}"))
                continue
            self._active.append(row)
            room -= ticket.row_cost
            ticket.admitted += 1
            if ticket.first_admitted is None:
                ticket.first_admitted = time.perf_counter()
            if ticket.admitted == len(ticket.job.labels):
                self._waiting.popleft()

    def _new_row(self, ticket: Ticket, image: int) -> Row:
        model, job = ticket.model, ticket.job
        chain = self._diffusion(model).chain(job.sampler, job.steps)
        generator = image_generator(job.seed, image)
        device = next(model.denoiser.parameters()).device
        x = torch.randn(tuple(model.config.latent_shape), generator=generator).to(device)
        return Row(ticket, image, chain, chain.num_timesteps - 1, x, generator, torch.zeros_like(x))

    def _diffusion(self, model: LatentDiffusion) -> GaussianDiffusion:
        """The model's diffusion, built once per model version (its respacings are cached)."""
        if id(model) not in self._diffusions:
            self._diffusions[id(model)] = (model, model.diffusion)
        return self._diffusions[id(model)][1]

    def _nets(self, model: LatentDiffusion) -> tuple[nn.Module, nn.Module | None, nn.Module]:
        """The denoiser, classifier and latent decoder as the scheduler calls them: at
        fixed widths when batch invariant, else as they are (built once per model
        version)."""
        if id(model) not in self._networks:
            denoiser, classifier = model.denoiser, model.classifier
            decoder: nn.Module = LatentDecoder(model.autoencoder)
            if self.batch_invariant:
                width = self.max_rows_per_forward
                if self.cuda_graph and next(denoiser.parameters()).is_cuda:
                    denoiser = CudaGraphed(denoiser)  # the classifier's gradient stays eager
                    decoder = CudaGraphed(decoder)
                denoiser = FixedWidth(denoiser, width)
                classifier = None if classifier is None else FixedWidth(classifier, width)
                decoder = FixedWidth(decoder, self.decode_width)
            self._networks[id(model)] = (model, denoiser, classifier, decoder)
        return self._networks[id(model)][1:]

    def _account(self, rows: Sequence[Row]) -> None:
        tickets = {id(r.ticket): r.ticket for r in rows}.values()
        for ticket in tickets:
            ticket.forwards += 1
            ticket.rows_seen += len(rows)
            ticket.max_rows = max(ticket.max_rows, len(rows))
            ticket.max_requests = max(ticket.max_requests, len(tickets))

    # ------------------------------------------------------------------ the forward
    def _advance_or_isolate(self, rows: Sequence[Row]) -> None:
        """Advance ``rows``; if that fails, advance each request's rows on their own so
        that only the request at fault fails (a server-side fault, e.g. a broken model)."""
        try:
            self._advance(rows)
            return
        except Exception as error:
            if len({id(r.ticket) for r in rows}) == 1:
                self._fail([rows[0].ticket], error)
                return
        tickets: dict[int, list[Row]] = {}
        for row in rows:
            tickets.setdefault(id(row.ticket), []).append(row)
        for own in tickets.values():
            try:
                self._advance(own)
            except Exception as error:
                self._fail([own[0].ticket], error)

    @torch.no_grad()
    def _advance(self, rows: Sequence[Row]) -> None:
        """One forward of ``rows`` (all of one model), then each row's own update. Rows
        change only once every part succeeded."""
        model = rows[0].ticket.model
        x = torch.stack([r.x for r in rows])
        device = x.device
        jobs = [r.ticket.job for r in rows]
        model_t = torch.tensor([int(r.chain.timestep_map[r.position]) for r in rows], device=device)
        labels = torch.tensor([r.ticket.job.labels[r.image] for r in rows], device=device)
        scales = [[j.guidance_scale for j in jobs], [j.classifier_scale for j in jobs]]
        w, s = (torch.tensor(v, dtype=torch.float32, device=device) for v in scales)
        sigma = _row_coefficients(rows, x)("sqrt_one_minus_alphas_cumprod")
        denoiser, classifier, _ = self._nets(model)
        cast = torch.autocast(
            device.type,
            self.autocast,
            enabled=self.autocast is not None,
            cache_enabled=not self.cuda_graph,  # a graph must not record the cast cache
        )
        with cast:
            eps = guided_eps(denoiser, x, model_t, labels, w, classifier, s, sigma)
        if any(j.eps_scaling != 1 or j.eps_scaling_slope != 0 for j in jobs):
            b = torch.tensor([j.eps_scaling for j in jobs], device=device)
            k = torch.tensor([j.eps_scaling_slope for j in jobs], device=device)
            eps = scale_eps(eps, epsilon_scale(model_t, rows[0].chain.train_timesteps, b, k))
        out, history = torch.empty_like(x), {}
        for sampler in {j.sampler for j in jobs}:
            index = [i for i, j in enumerate(jobs) if j.sampler == sampler]
            out[index], x0 = self._update(sampler, [rows[i] for i in index], x[index], eps[index])
            if x0 is not None:
                history.update(zip(index, x0, strict=True))
        for i, row in enumerate(rows):
            row.x = out[i]
            row.x0_previous = history.get(i, row.x0_previous)
            row.position -= 1

    @staticmethod
    def _update(
        sampler: str, rows: Sequence[Row], x: Tensor, eps: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """One step of ``sampler`` for ``rows``, each in its own chain at its own step:
        the new x and, for DPM-Solver++, each row's x̂_0 (its next step's history)."""
        coef = _row_coefficients(rows, x)
        if sampler == "ddpm":
            return ddpm_update(coef, x, eps, _noise(rows, x, [True] * len(rows))), None
        if sampler == "ddim":
            etas = [r.ticket.job.eta for r in rows]
            eta = torch.tensor(etas, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
            noise = _noise(rows, x, [e > 0 for e in etas]) if any(etas) else None
            return ddim_update(coef, x, eps, eta, noise), None
        history = torch.stack([r.x0_previous for r in rows])
        return dpmpp_2m_update(coef, x, eps, history)

    # ------------------------------------------------------------------ answers
    def _finish(self, done: Sequence[Row]) -> None:
        if not done:
            return
        with self._wakeup:
            self._active = [r for r in self._active if r.position >= 0]
        for row in done:
            row.ticket.latents[row.image] = row.x
        # Unpadded, a decode's width could move an image's rounding: one request a call.
        complete: dict[int, list[Ticket]] = {}
        for ticket in {id(r.ticket): r.ticket for r in done}.values():
            if len(ticket.latents) == len(ticket.job.labels):
                key = id(ticket.model) if self.batch_invariant else id(ticket)
                complete.setdefault(key, []).append(ticket)
        for tickets in complete.values():
            self._answer(tickets)

    def _answer(self, tickets: Sequence[Ticket]) -> None:
        """Decode the images of ``tickets`` (all of one model) together and answer each;
        if that fails, decode each request on its own so only the one at fault fails."""
        try:
            images = self._decode(tickets)
        except Exception as error:
            if len(tickets) == 1:
                self._fail(tickets, error)
            else:
                for ticket in tickets:
                    self._answer([ticket])
            return
        now = time.perf_counter()
        for ticket, own in zip(tickets, images, strict=True):
            first = ticket.first_admitted or now
            report = RequestReport(
                forwards=ticket.forwards,
                mean_rows_per_forward=ticket.rows_seen / max(1, ticket.forwards),
                max_rows_per_forward=ticket.max_rows,
                max_requests_per_forward=ticket.max_requests,
                queued_s=first - ticket.submitted,
                sampling_s=now - first,
            )
            self.stats.record_answer(len(own))
            _deliver(ticket, SampleResult(own, report))
        self._forget_model_if_idle(tickets[0].model)

    @torch.no_grad()
    def _decode(self, tickets: Sequence[Ticket]) -> list[np.ndarray]:
        """Each ticket's images as uint8, decoded ``decode_width`` at a time."""
        latents = torch.stack([t.latents[i] for t in tickets for i in range(len(t.job.labels))])
        decoder = self._nets(tickets[0].model)[2]
        pixels = torch.cat([decoder(part) for part in latents.split(self.decode_width)])
        images = to_uint8(pixels)
        ends = np.cumsum([len(t.job.labels) for t in tickets])[:-1]
        return np.split(images, ends)

    def _fail(self, tickets: Sequence[Ticket] | object, error: Exception) -> None:
        tickets = list(tickets)
        ids = {id(t) for t in tickets}
        with self._wakeup:
            self._active = [r for r in self._active if id(r.ticket) not in ids]
            self._waiting = deque(t for t in self._waiting if id(t) not in ids)
        for ticket in tickets:
            self.stats.failed += 1
            ticket.cancelled = True  # rows of it still in this step's list are ignored
            _deliver(ticket, SampleFailure(f"sampling failed: {type(error).__name__}: {error}"))

    def _forget_model_if_idle(self, model: LatentDiffusion) -> None:
        with self._wakeup:
            busy = any(r.ticket.model is model for r in self._active) or any(
                t.model is model for t in self._waiting
            )
            if not busy:
                self._diffusions.pop(id(model), None)
                self._networks.pop(id(model), None)
