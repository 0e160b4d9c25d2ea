"""The Ray Serve sampling app: ``serve run serving.app:build_app model_uri=models:/ldm@champion``.

Routes: ``POST /v1/samples``, ``GET /v1/model``, ``GET /healthz`` and a page at ``GET /``.
With ``LDM_API_TOKEN`` set where the app runs, the ``/v1/*`` routes require it as a
bearer token. A request passes :mod:`serving.admission` (token, media type, size,
JSON, work budget) before it may wait for a batch, and waits at most
``request_timeout_s``; Serve bounds the queue (503 with ``Retry-After`` beyond it).
A request is validated against the model version current when it arrives and is
sampled with that version, even if the alias moves meanwhile. Valid requests wait
in ``@serve.batch``; each batch is split into compatible groups (see
:mod:`serving.sampler`) and sampled in a worker thread, so the event loop keeps
accepting requests (and filling the next batch) while the network runs.
"""

# No ``from __future__ import annotations`` here: Serve reads the annotation of
# build_app's argument at run time to validate ``serve run`` arguments as AppConfig.

import asyncio
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
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
from serving.config import AppConfig
from serving.encoding import MEDIA_TYPES, base64_pngs, grid_png, npy_bytes
from serving.model_store import AliasWatcher, LoadedModel, ModelStore
from serving.page import PAGE_HTML
from serving.sampler import SampleFailure, SampleJob, SampleResult, sample_batch
from serving.schemas import (
    BatchInfo,
    ModelVersionInfo,
    RequestLimits,
    SampleRequest,
    SampleResponse,
    describe_errors,
)
from serving.stats import BatchStats

logger = logging.getLogger(__name__)

api = FastAPI(title="ldm sampling", docs_url=None, redoc_url=None)


# Helpers the deployment calls are defined above it: Serve serialises the class when
# it is decorated, so names defined after it would be missing in the replica.


def _respond(
    image_format: str, loaded: LoadedModel, job: SampleJob, result: SampleResult, elapsed: float
) -> Response:
    """The images of one request in the format it asked for, with model and batch facts."""
    report, classes = result.report, loaded.model.config.class_names
    body = SampleResponse(
        model=ModelVersionInfo(name=loaded.name, version=loaded.version, alias=loaded.alias),
        labels=list(job.labels),
        class_names=[classes[i] if classes else str(i) for i in job.labels],
        seed=job.seed,
        guidance_scale=job.guidance_scale,
        classifier_scale=job.classifier_scale,
        batch=BatchInfo(
            call_requests=report.call_requests,
            group_requests=report.group_requests,
            group_images=report.group_images,
            sampler=job.sampler,
            steps=job.steps,
            eta=job.eta,
        ),
        image_shape=list(result.images.shape[1:]),
        images=[],
        elapsed_s=round(elapsed, 4),
        sampling_s=round(report.sampling_s, 4),
    )
    if image_format == "json":
        body.images = base64_pngs(result.images)
        return JSONResponse(body.model_dump(mode="json"))
    headers = {
        "X-Model-Name": loaded.name,
        "X-Model-Version": loaded.version,
        "X-Seed": str(job.seed),
        "X-Labels": ",".join(map(str, job.labels)),
        "X-Elapsed-S": f"{elapsed:.4f}",
        "X-Sampling-S": f"{report.sampling_s:.4f}",
        "X-Batch-Call-Requests": str(report.call_requests),
        "X-Batch-Group-Requests": str(report.group_requests),
        "X-Batch-Group-Images": str(report.group_images),
    }
    data = grid_png(result.images) if image_format == "png" else npy_bytes(result.images)
    return Response(data, media_type=MEDIA_TYPES[image_format], headers=headers)


@serve.deployment(name="LDMSampler", health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(api)
class SamplerDeployment:
    """One replica: the current model version, its alias watcher and the batch queue."""

    def __init__(self, config: AppConfig):
        self.config = config
        # Read where the app runs (a Secret, the node's environment); never logged.
        self._token = os.environ.get(TOKEN_ENV) or None
        torch.set_num_threads(config.resolved_torch_threads)
        self.store = ModelStore(config.model_ref, str(config.tracking_uri), config.resolved_device)
        self.current: LoadedModel = self.store.load_current()
        self._limits: tuple[LoadedModel, RequestLimits] | None = None
        self.stats = BatchStats()
        # One thread: batches run one after another; the event loop stays free.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")
        self._sample_batch.set_max_batch_size(config.max_batch_size)
        self._sample_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
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
        self.current = loaded  # one reference assignment: requests keep what they captured

    def check_health(self) -> None:
        if self.watcher is not None and not self.watcher.is_alive():
            raise RuntimeError("the alias watcher thread stopped; replace this replica")

    def __del__(self) -> None:
        if getattr(self, "watcher", None) is not None:
            self.watcher.stop()

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
        )
        self._limits = (loaded, limits)
        return limits

    # ------------------------------------------------------------------ routes
    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE_HTML)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.current.name, "version": self.current.version}

    @api.get("/v1/model")
    async def model_info(self, request: Request) -> Response:
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
            "loaded_at": loaded.loaded_at,
            "class_names": list(limits.class_names),
            "num_classes": config.num_classes,
            "image_size": config.image_size,
            "image_channels": config.image_channels,
            "num_timesteps": config.diffusion.num_timesteps,
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
                "max_batch_size": c.max_batch_size,
                "batch_wait_timeout_s": c.batch_wait_timeout_s,
                "max_ongoing_requests": c.resolved_max_ongoing_requests,
                "max_queued_requests": c.max_queued_requests,
            },
            "reload": {
                "interval_s": c.reload_interval_s if watcher else 0,
                "last_check": watcher.last_check if watcher else None,
                "last_failure": watcher.last_failure if watcher else None,
            },
            "stats": self.stats.as_dict(),
        }

    @api.post("/v1/samples")
    async def samples(self, request: Request) -> Response:
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
            outcome = await asyncio.wait_for(self._sample_batch((loaded, job)), timeout)
        except TimeoutError:
            self.stats.timed_out += 1
            return error_response(
                504,
                f"the request did not finish within {timeout:g} s (this endpoint's "
                "request_timeout_s): retry later, or ask for fewer images or steps",
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

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _sample_batch(
        self, work: list[tuple[LoadedModel, SampleJob]]
    ) -> list[SampleResult | SampleFailure]:
        # Requests whose client left, or that timed out while queued, were cancelled
        # and are not in ``work``: Serve drops cancelled requests from a batch.
        pairs = [(loaded.model, job) for loaded, job in work]
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, sample_batch, pairs)
        self.stats.record(results)
        return results


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
