"""The Ray Serve sampling app: ``serve run serving.app:build_app model_uri=models:/ldm@champion``.

Routes: ``POST /v1/samples``, ``GET /v1/model``, ``GET /healthz`` and a page at ``GET /``.
With ``LDM_API_TOKEN`` set where the app runs, the ``/v1/*`` routes require it as a
bearer token. A request passes :mod:`serving.admission` (token, media type, size,
JSON, work budget) before it may wait for a batch, and waits at most
``request_timeout_s``; Serve bounds the queue (503 with ``Retry-After`` beyond it).
A request is validated against the model version current when it arrives and is
sampled with that version, even if the alias moves meanwhile. Valid requests go to
the replica's sampling engine (:mod:`serving.engine`): a
:class:`~serving.scheduler.StepScheduler` in a child process of the replica, with its
own interpreter (``engine: thread`` runs it in a thread instead). At every denoising
step it admits waiting images and runs one forward over all of them, whatever their
sampler, steps or guidance, so the event loop keeps accepting requests while the
network runs, and a request joins at the next step.
A request whose client leaves or that times out is dropped at the next step.
"""

# No ``from __future__ import annotations`` here: Serve reads the annotation of
# build_app's argument at run time to validate ``serve run`` arguments as AppConfig.

import asyncio
import logging
import os
import time
import uuid
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from serving.admission import (
    TOKEN_ENV,
    Refusal,
    check_budget,
    check_media_type,
    check_token,
    error_response,
    parse_json,
    read_body,
)
from serving.autoscaling import ACTIVE_ROWS, WAITING_ROWS
from serving.config import AppConfig
from serving.encoding import MEDIA_TYPES, base64_pngs, grid_png, npy_bytes
from serving.engine import Outcome, configure_torch, resolve_autocast, start_engine
from serving.metrics import EngineMetrics
from serving.model_store import AliasWatcher, LoadedModel, ModelStore
from serving.page import PAGE_HTML
from serving.sampler import SampleFailure, SampleJob, SampleResult
from serving.schemas import (
    BatchInfo,
    ModelVersionInfo,
    RequestLimits,
    SampleRequest,
    SampleResponse,
    describe_errors,
)

logger = logging.getLogger(__name__)

api = FastAPI(
    title="ldm sampling",
    summary="Class-conditional images from a registered latent diffusion model",
    description="The limits and classes of the version being served: `GET /v1/model`. "
    "With a token set on the server, send it as `Authorization: Bearer …`.",
    docs_url="/docs",
    redoc_url=None,
)
# The sample route reads its body itself (checks before parsing, the served version's
# classes and limits as validation context); the schema documents that body.
SAMPLES_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": SampleRequest.model_json_schema()}},
    }
}
SAMPLES_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": SampleResponse,
        "description": "format json: this body; png: one grid image; npy: the arrays. "
        "Every format carries the lineage headers X-Model-Name, X-Model-Version, "
        "X-Model-Run-Id and X-Dataset-Digest.",
        "content": {"image/png": {}, "application/x-npy": {}},
    },
    400: {"description": "the body is not UTF-8 JSON"},
    401: {"description": "a token is required and was missing or wrong"},
    413: {"description": "the body is larger than the endpoint accepts"},
    415: {"description": "the body is not application/json"},
    422: {"description": "a field is invalid: detail names it and what it allows"},
    503: {
        "description": "the queue is full, or the replica's sampling engine stopped and "
        "the replica is being replaced: retry after Retry-After seconds"
    },
    504: {"description": "the request did not finish within request_timeout_s"},
}


# Helpers the deployment calls are defined above it: Serve serialises the class when
# it is decorated, so names defined after it would be missing in the replica.


def _respond(
    image_format: str, loaded: LoadedModel, job: SampleJob, result: SampleResult, elapsed: float
) -> Response:
    """The images of one request in the format it asked for, with model and batch facts."""
    report, classes = result.report, loaded.model.config.class_names
    lineage = _lineage(loaded)
    body = SampleResponse(
        model=lineage,
        labels=list(job.labels),
        class_names=[classes[i] if classes else str(i) for i in job.labels],
        seed=job.seed,
        guidance_scale=job.guidance_scale,
        classifier_scale=job.classifier_scale,
        batch=BatchInfo(
            sampler=job.sampler,
            steps=job.steps,
            eta=job.eta,
            eps_scaling=job.eps_scaling,
            eps_scaling_slope=job.eps_scaling_slope,
            forwards=report.forwards,
            mean_rows_per_forward=round(report.mean_rows_per_forward, 3),
            max_rows_per_forward=report.max_rows_per_forward,
            max_requests_per_forward=report.max_requests_per_forward,
            queued_s=round(report.queued_s, 4),
        ),
        image_shape=list(result.images.shape[1:]),
        images=[],
        elapsed_s=round(elapsed, 4),
        sampling_s=round(report.sampling_s, 4),
    )
    if image_format == "json":
        body.images = base64_pngs(result.images)
        return JSONResponse(body.model_dump(mode="json"), headers=lineage.headers())
    headers = lineage.headers() | {
        "X-Seed": str(job.seed),
        "X-Labels": ",".join(map(str, job.labels)),
        "X-Elapsed-S": f"{elapsed:.4f}",
        "X-Sampling-S": f"{report.sampling_s:.4f}",
        "X-Queued-S": f"{report.queued_s:.4f}",
        "X-Batch-Forwards": str(report.forwards),
        "X-Batch-Max-Rows": str(report.max_rows_per_forward),
        "X-Batch-Max-Requests": str(report.max_requests_per_forward),
    }
    data = grid_png(result.images) if image_format == "png" else npy_bytes(result.images)
    return Response(data, media_type=MEDIA_TYPES[image_format], headers=headers)


def _lineage(loaded: LoadedModel) -> ModelVersionInfo:
    return ModelVersionInfo(
        name=loaded.name,
        version=loaded.version,
        alias=loaded.alias,
        run_id=loaded.run_id,
        dataset_url=loaded.dataset_url,
        dataset_digest=loaded.dataset_digest,
    )


def _settle(future: asyncio.Future, outcome: Outcome) -> None:
    if not future.done():  # it may have been cancelled: the client left or timed out
        future.set_result(outcome)


@serve.deployment(name="LDMSampler", health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(api)
class SamplerDeployment:
    """One replica: the current model version, its alias watcher and its sampling loop."""

    def __init__(self, config: AppConfig):
        self.config = config
        # Read where the app runs (a Secret, the node's environment); never logged.
        self._token = os.environ.get(TOKEN_ENV) or None
        settings = config.engine_settings()
        if settings.process:  # the engine's process samples; the replica's torch work is small
            torch.set_num_threads(1)
        else:
            configure_torch(settings)
        self.store = ModelStore(config.model_ref, str(config.tracking_uri), config.store_device)
        self.current: LoadedModel = self.store.load_current()
        self._limits: tuple[LoadedModel, RequestLimits] | None = None
        # The sampling loop runs in its own process (or thread); the event loop stays
        # free for requests.
        self.scheduler = start_engine(settings, after_step=EngineMetrics().after_step)
        self.scheduler.preload(self.current.model)
        self.stats = self.scheduler.stats
        self.watcher: AliasWatcher | None = None
        if config.model_ref.alias is not None and config.reload_interval_s > 0:
            self.watcher = AliasWatcher(
                self.store, lambda: self.current.version, self._swap, config.reload_interval_s
            ).start()
        logger.info(
            "serving %s version %s (token %s)",
            self.current.name,
            self.current.version,
            "required" if self._token else "not required",
        )

    def _swap(self, loaded: LoadedModel) -> None:
        self.scheduler.preload(loaded.model)  # its first request need not wait for it
        self.current = loaded  # one reference assignment: requests keep what they captured

    def check_health(self) -> None:
        if self.watcher is not None and not self.watcher.is_alive():
            raise RuntimeError("the alias watcher thread stopped; replace this replica")
        if not self.scheduler.is_alive():
            raise RuntimeError("the sampling engine stopped; replace this replica")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The work this replica holds, for :class:`serving.autoscaling.WaitingWorkPolicy`
        (Serve calls it when the deployment autoscales)."""
        active, waiting = self.scheduler.network_rows()
        return {ACTIVE_ROWS: active, WAITING_ROWS: waiting}

    def __del__(self) -> None:
        if getattr(self, "watcher", None) is not None:
            self.watcher.stop()
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.close()

    def limits_for(self, loaded: LoadedModel) -> RequestLimits:
        """The request limits for one model version (cached for the current one)."""
        if self._limits is not None and self._limits[0] is loaded:
            return self._limits[1]
        model, c = loaded.model.config, self.config
        limits = RequestLimits.for_model(
            model.class_names,
            model.num_classes,
            model.diffusion.num_timesteps,
            max_images=c.max_images_per_request,
            max_steps=c.max_steps,
            default_steps=c.resolved_default_steps,
            max_guidance_scale=c.max_guidance_scale,
            max_classifier_scale=c.max_classifier_scale,
            eps_defaults=loaded.eps_defaults,
        )
        self._limits = (loaded, limits)
        return limits

    # ------------------------------------------------------------------ routes
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE_HTML)

    @api.get("/favicon.ico", include_in_schema=False)
    async def favicon(self) -> Response:
        return Response(status_code=204)  # a browser asks; the page has none

    @api.get("/healthz", summary="Liveness, with the version served")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.current.name, "version": self.current.version}

    @api.get("/v1/model", summary="The model version served and this endpoint's limits")
    async def model_info(self, request: Request) -> Response:
        """Its name, version, alias, MLflow run and training dataset digest (the lineage
        of every image it makes), classes, limits, batching and statistics."""
        try:
            check_token(request.headers.get("authorization"), self._token)
        except Refusal as refusal:
            return refusal.response()
        return JSONResponse(self._describe(self.current))

    def _describe(self, loaded: LoadedModel) -> dict[str, Any]:
        """The model and the rules of this endpoint (no tracking URIs, no error texts)."""
        config, limits, c = loaded.model.config, self.limits_for(loaded), self.config
        watcher = self.watcher
        return {
            "name": loaded.name,
            "version": loaded.version,
            "alias": loaded.alias,
            "model_uri": c.model_uri,
            "run_id": loaded.run_id,
            "dataset_url": loaded.dataset_url,
            "dataset_digest": loaded.dataset_digest,
            "loaded_at": loaded.loaded_at,
            "class_names": list(limits.class_names),
            "num_classes": config.num_classes,
            "image_size": config.image_size,
            "image_channels": config.image_channels,
            "num_timesteps": config.diffusion.num_timesteps,
            "eps_scaling_defaults": loaded.eps_defaults.table,
            "config": config.model_dump(mode="json"),
            "limits": {
                "max_images_per_request": limits.max_images,
                "max_steps": limits.max_steps,
                "default_steps": limits.default_steps,
                "max_guidance_scale": limits.max_guidance_scale,
                "max_classifier_scale": limits.max_classifier_scale,
                "max_evaluations_per_request": c.max_evaluations_per_request,
                "request_timeout_s": c.request_timeout_s,
                "token_required": self._token is not None,
            },
            "batching": {
                "scheduling": "step" if c.join_running else "request",
                "engine": c.engine,
                "autocast": resolve_autocast(c.autocast, c.resolved_device),
                "deterministic": c.deterministic,
                "batch_invariant": c.resolved_batch_invariant,
                "cuda_graph": c.resolved_cuda_graph,
                "max_rows_per_forward": c.resolved_max_rows_per_forward,
                "decode_width": c.decode_width,
                "max_ongoing_requests": c.resolved_max_ongoing_requests,
                "max_queued_requests": c.max_queued_requests,
            },
            "reload": {
                "interval_s": c.reload_interval_s if watcher else 0,
                "last_check": watcher.last_check if watcher else None,
                "last_failure": watcher.last_failure if watcher else None,
            },
            "stats": self.stats.as_dict(self.scheduler.waiting_rows, self.scheduler.active_rows),
        }

    @api.post(
        "/v1/samples",
        summary="Sample images",
        openapi_extra=SAMPLES_OPENAPI,
        responses=SAMPLES_RESPONSES,
    )
    async def samples(self, request: Request) -> Response:
        """Images of the requested classes from the version served now. Limits and
        class names: ``GET /v1/model``; every refusal says which field to fix."""
        arrived = time.perf_counter()
        loaded = self.current  # this request is validated against and sampled with it
        limits = self.limits_for(loaded)
        try:
            parsed, job = await self._admit(request, limits)
        except Refusal as refusal:
            self.stats.rejected += 1
            return refusal.response()
        timeout = self.config.request_timeout_s
        try:
            outcome = await self._sample(loaded, job, timeout)
        except TimeoutError:
            self.stats.timed_out += 1
            return error_response(
                504,
                f"the request did not finish within {timeout:g} s (this endpoint's "
                "request_timeout_s): retry later, or ask for fewer images or steps",
            )
        if isinstance(outcome, SampleFailure) and outcome.retryable:
            logger.error("request not sampled: %s", outcome.message)
            return error_response(
                503,
                "this replica's sampling engine stopped and the replica is being replaced: "
                f"retry after {self.config.retry_after_s} s",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )
        if isinstance(outcome, SampleFailure):
            request_id = uuid.uuid4().hex[:16]
            logger.error("request %s failed: %s", request_id, outcome.message)
            return error_response(
                500,
                f"sampling failed on the server (request id {request_id}); the replica's "
                "log has the details",
                request_id=request_id,
            )
        return _respond(parsed.format, loaded, job, outcome, time.perf_counter() - arrived)

    async def _admit(
        self, request: Request, limits: RequestLimits
    ) -> tuple[SampleRequest, SampleJob]:
        """Token, media type, size, JSON, fields, work budget: a request that passes
        them all can be sampled."""
        headers = request.headers
        check_token(headers.get("authorization"), self._token)
        check_media_type(headers.get("content-type"))
        body = await read_body(headers.get("content-length"), request.stream())
        parse_json(body)
        try:
            parsed = SampleRequest.model_validate_json(body, context=limits)
        except ValidationError as error:
            problems = describe_errors(error, limits)
            detail = "; ".join(
                f"{p['field']}: {p['message']} (allowed: {p['allowed']})" for p in problems
            )
            raise Refusal(422, detail, problems) from None
        job = parsed.to_job(limits)
        check_budget(job, self.config.max_evaluations_per_request)
        return parsed, job

    async def _sample(self, loaded: LoadedModel, job: SampleJob, timeout: float) -> Outcome:
        """Hand ``job`` to the scheduler and wait for its images. If this coroutine is
        cancelled (the client left) or times out, the scheduler drops the job at its
        next step."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        ticket = self.scheduler.submit(
            loaded.model, job, lambda outcome: loop.call_soon_threadsafe(_settle, future, outcome)
        )
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            if future.cancelled() or not future.done():
                self.scheduler.cancel(ticket)


def build_app(args: AppConfig) -> Application:
    """The sampling app for ``args`` (an :class:`AppConfig` or a dict of its fields).

    Without ``tracking_uri``, MLFLOW_TRACKING_URI is used, else the sqlite file that
    ``ldm train`` writes under LDM_HOME (or ./outputs).
    """
    config = AppConfig.model_validate(args)
    if config.tracking_uri is None:
        from training.job import default_local_store
        from training.mlflow.tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(default_local_store())
        config = config.model_copy(update={"tracking_uri": uri})
    return SamplerDeployment.options(**config.deployment_options()).bind(config)
