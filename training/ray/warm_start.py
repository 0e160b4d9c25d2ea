"""``ldm train --init-from models:/NAME@ALIAS``: a new run whose networks start from a
registered version's weights instead of from scratch, each stage fine-tuning for the
job's own step budget.

The networks (and the diffusion schedule they were trained for) are the version's;
the step budgets, schedules and seed are the job's. The denoiser starts from the
version's EMA weights, which are the ones it samples with. With ``reuse_autoencoder``
the version's autoencoder and its latent scale are kept as they are: its stage is
skipped, and the latents the denoiser fine-tunes on are the ones it was trained on.

The weights are written into the run's storage (``<run>/init/<stage>/``) before the
run starts, so Ray workers on any node read them the way they read checkpoints; the
reused autoencoder is written there as the stage's final checkpoint. The run is tagged
with the version it started from, and so is the version it registers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow import MlflowClient

from data import storage
from training.checkpoints import STATE_FILE, StageState, save_checkpoint, save_weights
from training.config import LDMConfig
from training.job import TrainJobConfig
from training.latent_diffusion import LatentDiffusion
from training.mlflow.registry import load_model_version, resolve_model_version
from training.optimisation import make_optimisation
from training.ray.starting_point import StartingPoint, with_budgets
from training.stages import STAGES, get_stage

INIT_FROM_TAG = "ldm.init_from"
PARENT_VERSION_TAG = "ldm.parent_version"  # NAME/VERSION, on the run and the new version
PARENT_RUN_TAG = "ldm.parent_version.run_id"
REUSED_AUTOENCODER_TAG = "ldm.reused_autoencoder"
INIT_WEIGHTS_FILE = "model.safetensors"


def plan_warm_start(job: TrainJobConfig) -> StartingPoint:
    """Read the version ``job.init_from`` names, write its weights into the run's
    storage and say where each stage starts. ValueError when the version cannot be
    read or does not fit the job's dataset."""
    uri = job.init_from or ""
    try:
        name, version = resolve_model_version(uri, job.tracking_uri)
        parent = load_model_version(f"models:/{name}/{version}", job.tracking_uri)
    except LookupError as error:
        raise ValueError(f"--init-from: {error}") from None
    _check_fits(parent.config, job.model, uri)
    config = with_budgets(parent.config, job.model).model_copy(
        update={"seed": job.model.seed, "class_names": job.model.class_names}
    )
    parent_run = MlflowClient(job.tracking_uri).get_model_version(name, version).run_id
    root = f"{job.storage_url}/{job.run_name}/init"
    finished, options = {}, {}
    for stage in STAGES:
        net = stage.network(parent)
        if stage.name == "autoencoder" and job.reuse_autoencoder:
            finished[stage.name] = _as_final_checkpoint(parent, config, f"{root}/{stage.name}")
        else:
            weights = f"{root}/{stage.name}/{INIT_WEIGHTS_FILE}"
            save_weights(weights, net.state_dict())
            options[stage.name] = {"init_weights": weights}
    parent_version = f"{name}/{version}"
    tags = {
        INIT_FROM_TAG: uri,
        PARENT_VERSION_TAG: parent_version,
        PARENT_RUN_TAG: parent_run or "",
        REUSED_AUTOENCODER_TAG: str(job.reuse_autoencoder).lower(),
    }
    return StartingPoint(
        config=config,
        finished=finished,
        stage_options=options,
        tags=tags,
        version_tags={PARENT_VERSION_TAG: parent_version},
    )


def _check_fits(parent: LDMConfig, data: LDMConfig, uri: str) -> None:
    """The version's networks take the dataset's images and classes."""
    have = (parent.image_channels, parent.image_size, parent.num_classes)
    want = (data.image_channels, data.image_size, data.num_classes)
    if have != want:
        raise ValueError(
            f"--init-from {uri} was trained on {have[0]}x{have[1]}x{have[1]} images of "
            f"{have[2]} classes, the dataset has {want[0]}x{want[1]}x{want[1]} images of "
            f"{want[2]} classes: train this dataset from scratch (without --init-from), or "
            "shard it to the version's image size and channels"
        )


def _as_final_checkpoint(parent: LatentDiffusion, config: LDMConfig, url: str) -> str:
    """The version's autoencoder as the autoencoder stage's final checkpoint of this
    run (at the job's step budget, with a fresh optimiser), under ``config`` with the
    version's latent scale; returns its URL."""
    stage = get_stage("autoencoder")
    net = stage.network(parent)
    training = stage.training(config)
    optimisation = make_optimisation(net, training)
    state = StageState(
        stage=stage.name,
        step=training.steps,
        epoch=0,
        batches_into_epoch=0,
        model=net.state_dict(),
        optimizer=optimisation.optimizer.state_dict(),
        scheduler=optimisation.scheduler.state_dict(),
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, state, config)
        # the state file last: a folder that has it is complete
        for path in sorted(Path(tmp).iterdir(), key=lambda p: p.name == STATE_FILE):
            storage.put_file(path, f"{url}/{path.name}")
    return url
