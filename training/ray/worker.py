"""The Ray Train worker function: the stages of a training job on one rank.

Each worker reads only its :class:`WorkerGroupJob` argument and trains its stages in
order in the same process (one worker group for the whole job, not a ``fit()`` per
stage); between the autoencoder and the first latent stage the ranks cache the
latents. Ranks stream disjoint shards, DDP averages gradients, and rank 0 alone writes
checkpoints and logs to MLflow. ``ray.train.report`` is a barrier, so every rank
reports at the same steps. Every checkpoint names its stage; the final one of each
stage outranks the others, so Ray Train keeps it however many of the next stage follow.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import Tensor, nn

from data.reader import build_loader
from training.checkpoints import (
    StageState,
    checkpoint_artifact_path,
    load_autoencoder,
    load_checkpoint,
    load_checkpoint_uri,
    load_weights,
    save_checkpoint,
)
from training.config import StageConfig
from training.images import make_grid, to_uint8
from training.job import StageJob, WorkerGroupJob
from training.mlflow.run_tracker import RunTracker
from training.models import EMA, Autoencoder
from training.optimisation import (
    FiniteLossGuard,
    Optimisation,
    autocast_dtype,
    batches_on_device,
    compiled,
    configure_device,
    make_optimisation,
    memory_format,
)
from training.plots import label_rows
from training.progress import StageProgress, quiet_libraries
from training.ray.latent_cache import cache_latents_on_ranks
from training.stages import Stage, get_stage
from training.step import StageStep, uses_cuda_graph

WORKERS_FOLDER = "workers"  # in the final checkpoint: one JSON record per rank
GRID_SAMPLES_PER_CLASS = 4
GRID_KEY = "samples/denoiser"  # an image series of the run, one step per grid
GRID_SAMPLER, GRID_STEPS = "ddim", 50  # the grid's chain: what the page samples with
# A checkpoint's keep score (the metric Ray Train keeps the best of): a stage's final
# checkpoint outranks every other, a later stage's outrank an earlier one's, then by step.
KEEP_SCORE = "keep_score"
STAGE_RANK, FINAL_RANK = 10**12, 10**15


@dataclass
class _Run:
    """One rank's state in one stage: its networks, its optimiser, where it stands."""

    job: StageJob
    stage: Stage
    index: int  # its place in the worker group
    rank: int
    world: int
    device: torch.device
    net: nn.Module  # the network itself: its weights go into checkpoints
    model: nn.Module  # ``net`` as Ray Train prepared it (DDP across ranks)
    optimisation: Optimisation
    ema: EMA | None
    cuda_graph: bool  # its steps run as a CUDA graph (training.step)
    tracker: RunTracker | None  # rank 0 only
    step: int
    epoch: int
    into_epoch: int  # batches of ``epoch`` already trained on
    logged_at: float = field(default_factory=time.perf_counter)  # images/s covers whole
    logged_step: int = 0  # intervals between two logged steps
    progress: StageProgress | None = None  # rank 0's console lines

    @property
    def training(self) -> StageConfig:
        return self.job.training


def train_worker(group_json: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point: train each stage of the group until its step budget is
    spent, from where the group's latest checkpoint left it (after a restart or a
    re-run: the stages before that checkpoint's are finished and skipped).

    Returns ``{"rank", "steps": {stage: step}}``, plus ``"nonfinite_stage"`` and
    ``"nonfinite_step"`` when a loss was inf or NaN: every rank then stops at the same
    check, before any later checkpoint or stage, and the driver raises
    :class:`training.optimisation.NonFiniteLoss`.
    """
    group = WorkerGroupJob.model_validate(group_json)
    configure_device(ray.train.torch.get_device())
    restored = _load_state(ray.train.get_checkpoint())
    order = [job.stage for job in group.stages]
    result: dict[str, Any] = {"rank": ray.train.get_context().get_world_rank(), "steps": {}}
    for index, job in enumerate(group.stages):
        state = restored if restored is not None and restored.stage == job.stage else None
        if state is None and job.start_from is not None:
            state = _load_state(ray.train.Checkpoint(job.start_from))
        later = restored is not None and index < order.index(restored.stage)
        if later or (state is not None and state.step >= job.training.steps):
            continue  # finished before this attempt: its final checkpoint is kept
        job = _after_autoencoder(job, trained_here="autoencoder" in order[:index])
        run = _start(job, index, state)
        bad_step = _train(run)
        every = run.job.job.sample_every
        if run.tracker and run.ema and bad_step is None and (every == 0 or run.step % every):
            _log_grid(run.tracker, run.job, run.ema.model, run.step)
        if run.tracker:
            run.tracker.close()  # waits out an MLflow outage (up to the budget) before finishing
        result["steps"][job.stage] = run.step
        if bad_step is not None:
            return result | {"nonfinite_stage": job.stage, "nonfinite_step": bad_step}
    return result


def _after_autoencoder(job: StageJob, trained_here: bool) -> StageJob:
    """A latent stage's job with the autoencoder it follows: the one trained earlier in
    this worker group (``trained_here``) when the driver could not name it (its final
    checkpoint, and the config with the latent scale it measured), and the latent cache
    made by the ranks if it is not there yet."""
    if get_stage(job.stage).inputs != "latents":
        return job
    if job.autoencoder_checkpoint is None and trained_here:
        uri = reported_final_checkpoint("autoencoder", job.job.storage_url)
        _, config = load_checkpoint_uri(uri)
        settings = job.job.model_copy(update={"model": config})
        job = job.model_copy(update={"autoencoder_checkpoint": uri, "job": settings})
    if job.latents_from is not None:
        if job.autoencoder_checkpoint is None:
            raise ValueError(f"the {job.stage} stage caches latents but names no autoencoder")
        ctx = ray.train.get_context()
        cache_latents_on_ranks(
            job.latents_from,
            job.autoencoder_checkpoint,
            job.data_url,
            job.job.model,
            ctx.get_world_rank(),
            ctx.get_world_size(),
            job.job.scaling.torch_threads,
            ray.train.torch.get_device(),
        )
    return job


def reported_final_checkpoint(stage: str, storage_url: str) -> str:
    """The URI of ``stage``'s final checkpoint among those this run reported (this
    attempt's and, after a restart or a re-run, the earlier ones')."""
    for reported in reversed(ray.train.get_all_reported_checkpoints()):
        if reported.metrics.get("stage") == stage and reported.metrics.get("final"):
            return checkpoint_uri(reported.checkpoint.path, storage_url)
    raise RuntimeError(f"no final {stage} checkpoint was reported in this run")


def checkpoint_uri(path: str, storage_url: str) -> str:
    """A checkpoint's path as Ray Train gives it, as a URI in ``storage_url``'s scheme."""
    return f"s3://{path.lstrip('/')}" if storage_url.startswith("s3://") else path


def _load_state(checkpoint: ray.train.Checkpoint | None) -> StageState | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        state, _ = load_checkpoint(folder)
    return state


def _start(job: StageJob, index: int, state: StageState | None) -> _Run:
    """Seed this rank, build the stage's network (from its initial weights, if given)
    and optimiser, and restore them from ``state`` (the run's latest checkpoint of this
    stage, or the checkpoint it starts from) if there is one."""
    stage = get_stage(job.stage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    config, training = job.job.model, job.training
    torch.set_num_threads(job.job.scaling.torch_threads)
    torch.manual_seed(config.seed * 1000 + rank)
    device = ray.train.torch.get_device()
    net = stage.build(config)
    if job.init_weights is not None:  # a warm start; a checkpoint of the run overrides it
        net.load_state_dict(load_weights(job.init_weights))
    net = net.to(device, memory_format=memory_format(training))
    graph = uses_cuda_graph(training, device, world)
    optimisation = make_optimisation(net, training, graph_device=device if graph else None)
    ema = EMA(net, training.ema_decay) if stage.keeps_ema else None
    step, epoch, into_epoch = _restore(net, optimisation, ema, state)
    model = compiled(ray.train.torch.prepare_model(net), training)
    quiet_libraries(job.job.verbose)
    tracker = None
    if rank == 0:
        job.job.tracking.apply_to_client()
        tracker = RunTracker(job.job.tracking_uri, job.run_id, job.job.tracking.outage_budget_s)
        tracker.monitor_system()
        # what the stage's precision setting became on this device (1: bf16 autocast)
        bf16 = autocast_dtype(training, device) == torch.bfloat16
        applied = {"bf16_autocast": bf16, "cuda_graph": graph}  # 1: in use on this device
        tracker.log_metrics({f"{job.stage}/{k}": float(v) for k, v in applied.items()}, step)
        if step > 0:
            tracker.log_metrics({f"{job.stage}/resumed_from_step": step}, step)
    return _Run(
        job,
        stage,
        index,
        rank,
        world,
        device,
        net,
        model,
        optimisation,
        ema,
        graph,
        tracker,
        step,
        epoch,
        into_epoch,
        logged_step=step,
        progress=StageProgress(
            job.stage, training.steps, training.batch_size * world, start_step=step
        )
        if rank == 0
        else None,
    )


def _train(run: _Run) -> int | None:
    """Steps until the budget is spent; returns the first step whose loss was not
    finite (then every rank stops at the same check), else None."""
    job, training, config = run.job, run.training, run.job.job.model
    diffusion = config.diffusion.build()
    guard, distributed = FiniteLossGuard(run.device), run.world > 1
    step = StageStep(
        lambda model, x, y: run.stage.losses(model, x, y, diffusion, config),
        run.model,
        run.optimisation,
        run.ema,
        training,
        run.device,
        graph=run.cuda_graph,
    )
    while run.step < training.steps:
        loader = build_loader(
            job.data_url,
            "train",
            run.rank,
            run.world,
            training.batch_size,
            config.seed,
            run.epoch,
            num_workers=job.job.loader_workers,
            memory_budget=job.job.loader_memory_mb << 20,
            sampling=training.shard_sampling,
        )
        batches = itertools.islice(loader, run.into_epoch, None)
        for x, y in batches_on_device(batches, run.device, training):
            losses, grad_norm = step(x, y)
            guard.observe(losses["loss"], run.step + 1)
            run.step, run.into_epoch = run.step + 1, run.into_epoch + 1
            checkpoint_due = run.step % job.job.checkpoint_every == 0 or run.step == training.steps
            # Every rank checks at the same steps (collective), before any checkpoint.
            if run.step % training.log_every == 0 or checkpoint_due:
                bad_step = guard.first_bad_step(distributed)
                if bad_step is not None:
                    return bad_step
            _log_step(run, losses, grad_norm)
            if checkpoint_due:
                _report(run, final=run.step == training.steps, loader=loader)
            if run.step == training.steps:
                return None
        run.epoch, run.into_epoch = run.epoch + 1, 0
    return None


def _log_step(run: _Run, losses: dict[str, Tensor], grad_norm: Tensor) -> None:
    """Rank 0 logs the step's metrics every ``log_every`` steps, a sample grid every
    ``sample_every`` steps (stages with an EMA)."""
    if run.tracker is None:
        return
    training, step = run.training, run.step
    if run.progress is not None and (step % training.log_every == 0 or step == training.steps):
        run.progress.update(step, float(losses["loss"].detach()))
    if step % training.log_every == 0:
        now = time.perf_counter()
        images = (step - run.logged_step) * training.batch_size * run.world
        metrics = {k: float(v.detach()) for k, v in losses.items()}
        metrics |= {
            "grad_norm": float(grad_norm),
            "images_per_s": images / (now - run.logged_at),
            "epoch": run.epoch,
            "learning_rate": run.optimisation.learning_rate,
        }
        run.logged_at, run.logged_step = now, step
        run.tracker.log_metrics({f"{run.job.stage}/{k}": v for k, v in metrics.items()}, step)
    every = run.job.job.sample_every
    if run.ema is not None and every and step % every == 0:
        _log_grid(run.tracker, run.job, run.ema.model, step)


def _restore(
    net: nn.Module, optimisation, ema: EMA | None, state: StageState | None
) -> tuple[int, int, int]:
    if state is None:
        return 0, 0, 0
    net.load_state_dict(state.model)
    optimisation.load_state_dict(state.optimizer, state.scheduler)
    if ema is not None and state.ema is not None:
        ema.load_state_dict(state.ema)
    return state.step, state.epoch, state.batches_into_epoch


def _report(run: _Run, final: bool, loader: Iterable) -> None:
    """A checkpoint of every rank at the same step (``ray.train.report`` is a barrier):
    rank 0's holds the weights and the optimiser; the final one, each rank's record and,
    where the stage measures something at its end (the latent scale), the config with it."""
    config, finish = run.job.job.model, run.stage.finish
    if final and finish is not None and run.rank == 0:
        config = finish(config, run.net, (x.to(run.device) for x, _ in loader))
    metrics = {
        "stage": run.job.stage,
        "step": run.step,
        "epoch": run.epoch,
        "final": final,
        KEEP_SCORE: FINAL_RANK + run.index if final else run.index * STAGE_RANK + run.step,
    }
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if final:  # every rank signs the final checkpoint: which node trained what
            _write_worker_record(Path(tmp), run.rank, run.step)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        if run.rank == 0:
            state = StageState(
                stage=run.job.stage,
                step=run.step,
                epoch=run.epoch,
                batches_into_epoch=run.into_epoch,
                model=run.net.state_dict(),
                optimizer=run.optimisation.optimizer.state_dict(),
                scheduler=run.optimisation.scheduler.state_dict(),
                ema=run.ema.state_dict() if run.ema is not None else None,
                run_id=run.job.run_id,
            )
            save_checkpoint(tmp, state, config)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            settings = run.job.job
            if run.tracker is not None and settings.logs_checkpoint(final):
                run.tracker.log_checkpoint(
                    tmp,
                    checkpoint_artifact_path(run.job.stage, run.step),
                    settings.mlflow_checkpoints_kept,
                )
        ray.train.report(metrics, checkpoint=checkpoint)


def _write_worker_record(folder: Path, rank: int, step: int) -> None:
    record = {
        "rank": rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "steps": step,
    }
    (folder / WORKERS_FOLDER).mkdir(exist_ok=True)
    (folder / WORKERS_FOLDER / f"rank-{rank}.json").write_text(json.dumps(record))


@torch.no_grad()
@functools.lru_cache(maxsize=1)
def _autoencoder(checkpoint_uri: str) -> Autoencoder:
    """The stage's decoder for sample grids, read once per worker process."""
    return load_autoencoder(checkpoint_uri)


def _log_grid(tracker: RunTracker, job: StageJob, denoiser: nn.Module, step: int) -> None:
    """A class-conditional grid (one row per class) decoded to pixels, as a run artifact."""
    if job.autoencoder_checkpoint is None:
        return
    device = next(denoiser.parameters()).device
    autoencoder = _autoencoder(job.autoencoder_checkpoint).to(device)
    config = job.job.model
    y = torch.arange(config.num_classes).repeat_interleave(GRID_SAMPLES_PER_CLASS)
    z0 = config.diffusion.build().sample(
        denoiser,
        (len(y), *config.latent_shape),
        y=y.to(device),
        guidance_scale=2.0,
        sampler=GRID_SAMPLER,
        steps=min(GRID_STEPS, config.diffusion.num_timesteps),
        generator=torch.Generator().manual_seed(config.seed),
    )
    grid = make_grid(to_uint8(autoencoder.decode_latents(z0)), ncols=GRID_SAMPLES_PER_CLASS)
    names = config.class_names or tuple(str(k) for k in range(config.num_classes))
    tracker.log_image(label_rows(grid, names), key=GRID_KEY, step=step)
