"""The Ray Train worker function: one stage of the pipeline on one rank.

Each worker reads only its :class:`StageJob` argument. Ranks stream disjoint
shards, DDP averages gradients, and rank 0 alone writes checkpoints and logs to
MLflow. ``ray.train.report`` is a barrier, so every rank reports at the same steps.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from data.reader import build_loader
from training.checkpoints import (
    StageState,
    load_checkpoint,
    load_checkpoint_uri,
    save_checkpoint,
)
from training.images import make_grid, to_uint8
from training.job import StageJob
from training.mlflow.run_tracker import RunTracker
from training.models import EMA, Autoencoder
from training.optimisation import FiniteLossGuard, make_optimisation
from training.stages import get_stage

WORKERS_FOLDER = "workers"  # in the final checkpoint: one JSON record per rank
GRID_SAMPLES_PER_CLASS = 4


def train_worker(job_json: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point: train ``job.stage`` until its step budget is spent.

    Returns ``{"rank", "step", "epoch"}``, plus ``"nonfinite_step"`` when a loss was
    inf or NaN: every rank then stops at the same check, before any later checkpoint,
    and the driver raises :class:`training.stages.NonFiniteLoss`.
    """
    job = StageJob.model_validate(job_json)
    stage = get_stage(job.stage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    config, training = job.job.model, job.training
    torch.set_num_threads(job.job.scaling.torch_threads)
    torch.manual_seed(config.seed * 1000 + rank)
    device = ray.train.torch.get_device()
    diffusion = config.diffusion.build()

    net = stage.build(config).to(device)
    optimisation = make_optimisation(net, training)
    ema = EMA(net, training.ema_decay) if stage.keeps_ema else None
    step, epoch, into_epoch = _restore(net, optimisation, ema)
    model = ray.train.torch.prepare_model(net)
    tracker = None
    if rank == 0:
        job.job.tracking.apply_to_client()
        tracker = RunTracker(job.job.tracking_uri, job.run_id, job.job.tracking.outage_budget_s)
    if tracker and step > 0:
        tracker.log_metrics({f"{job.stage}/resumed_from_step": step}, step)
    guard, distributed = FiniteLossGuard(device), world > 1

    logged_at, logged_step = time.perf_counter(), step  # images/s covers whole intervals
    bad_step = None
    while step < training.steps and bad_step is None:
        loader = build_loader(
            job.data_url,
            "train",
            rank,
            world,
            training.batch_size,
            config.seed,
            epoch,
            num_workers=job.job.loader_workers,
        )
        for x, y in itertools.islice(loader, into_epoch, None):
            x, y = x.to(device), y.to(device)
            model.train()
            # bf16 autocast on GPUs: matmuls and convolutions in bf16, the loss in fp32.
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                losses = stage.losses(model, x, y, diffusion, config)
            guard.observe(losses["loss"], step + 1)
            grad_norm = optimisation.step(losses["loss"], model)
            if ema is not None:
                ema.update(model)
            step, into_epoch = step + 1, into_epoch + 1
            checkpoint_due = step % job.job.checkpoint_every == 0 or step == training.steps
            # Every rank checks at the same steps (collective), before any checkpoint.
            if step % training.log_every == 0 or checkpoint_due:
                bad_step = guard.first_bad_step(distributed)
                if bad_step is not None:
                    break
            if tracker and step % training.log_every == 0:
                now = time.perf_counter()
                rate = (step - logged_step) * training.batch_size * world / (now - logged_at)
                logged_at, logged_step = now, step
                metrics = {k: float(v.detach()) for k, v in losses.items()}
                metrics |= {
                    "grad_norm": float(grad_norm),
                    "images_per_s": rate,
                    "epoch": epoch,
                    "learning_rate": optimisation.learning_rate,
                }
                tracker.log_metrics({f"{job.stage}/{k}": v for k, v in metrics.items()}, step)
            if tracker and ema and job.job.sample_every and step % job.job.sample_every == 0:
                _log_grid(tracker, job, ema.model, step)
            if checkpoint_due:
                final = step == training.steps
                _report(job, rank, net, optimisation, ema, step, epoch, into_epoch, final, loader)
            if step == training.steps:
                break
        else:
            epoch, into_epoch = epoch + 1, 0
    every = job.job.sample_every
    if tracker and ema is not None and bad_step is None and (every == 0 or step % every):
        _log_grid(tracker, job, ema.model, step)
    if tracker:
        tracker.close()  # waits out an MLflow outage (up to the budget) before finishing
    result = {"rank": rank, "step": step, "epoch": epoch}
    return result if bad_step is None else result | {"nonfinite_step": bad_step}


def _restore(net: nn.Module, optimisation, ema: EMA | None) -> tuple[int, int, int]:
    """Load the latest checkpoint of this run (after a restart or a re-run), if any."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0, 0
    with checkpoint.as_directory() as folder:
        state, _ = load_checkpoint(folder)
    net.load_state_dict(state.model)
    optimisation.optimizer.load_state_dict(state.optimizer)
    optimisation.scheduler.load_state_dict(state.scheduler)
    if ema is not None and state.ema is not None:
        ema.load_state_dict(state.ema)
    return state.step, state.epoch, state.batches_into_epoch


def _report(job, rank, net, optimisation, ema, step, epoch, into_epoch, final, loader) -> None:
    config, finish = job.job.model, get_stage(job.stage).finish
    if final and finish is not None and rank == 0:  # e.g. the latent scale, kept with it
        device = next(net.parameters()).device
        config = finish(config, net, (x.to(device) for x, _ in loader))
    metrics = {"step": step, "epoch": epoch, "final": final}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if final:  # every rank signs the final checkpoint: which node trained what
            _write_worker_record(Path(tmp), rank, step)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        if rank == 0:
            state = StageState(
                stage=job.stage,
                step=step,
                epoch=epoch,
                batches_into_epoch=into_epoch,
                model=net.state_dict(),
                optimizer=optimisation.optimizer.state_dict(),
                scheduler=optimisation.scheduler.state_dict(),
                ema=ema.state_dict() if ema is not None else None,
            )
            save_checkpoint(tmp, state, config)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
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
    state, config = load_checkpoint_uri(checkpoint_uri)
    autoencoder = Autoencoder(config.autoencoder)
    autoencoder.load_state_dict(state.model)
    return autoencoder.eval()


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
        sampler="ddpm",
        steps=min(100, config.diffusion.num_timesteps),
        generator=torch.Generator().manual_seed(config.seed),
    )
    grid = make_grid(to_uint8(autoencoder.decode_latents(z0)), ncols=GRID_SAMPLES_PER_CLASS)
    tracker.log_image(grid, f"samples/denoiser_step_{step:07d}.png")
