"""Resumable training state of one stage, written to a folder that Ray Train uploads.

``state.pt`` holds tensors and plain numbers only (model, EMA, optimiser and
scheduler state, step, data epoch and batches read in it) and is read with
``weights_only=True``, so a checkpoint cannot run code when loaded.
``config.json`` is the model config the stage was built with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.config import LDMConfig
from training.models import Autoencoder

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"


@dataclass
class StageState:
    """Everything needed to continue a stage exactly where it stopped."""

    stage: str
    step: int
    epoch: int
    batches_into_epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    ema: dict[str, torch.Tensor] | None = None


def save_checkpoint(directory: str | Path, state: StageState, config: LDMConfig) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "stage": state.stage,
            "step": state.step,
            "epoch": state.epoch,
            "batches_into_epoch": state.batches_into_epoch,
            "model": state.model,
            "optimizer": state.optimizer,
            "scheduler": state.scheduler,
            "ema": state.ema,
        },
        directory / STATE_FILE,
    )
    (directory / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
    return directory


def load_checkpoint_uri(uri: str) -> tuple[StageState, LDMConfig]:
    """Load a stage checkpoint from a local folder or an ``s3://`` URI (via Ray's storage)."""
    import ray.train

    with ray.train.Checkpoint(uri).as_directory() as folder:
        return load_checkpoint(folder)


def load_autoencoder(checkpoint_uri: str) -> Autoencoder:
    """The trained autoencoder of an autoencoder-stage checkpoint, in eval mode on the
    CPU, under the config the checkpoint carries (with the measured latent scale)."""
    state, config = load_checkpoint_uri(checkpoint_uri)
    autoencoder = Autoencoder(config.autoencoder)
    autoencoder.load_state_dict(state.model)
    return autoencoder.eval()


def load_checkpoint(directory: str | Path) -> tuple[StageState, LDMConfig]:
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a stage checkpoint folder")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    config = LDMConfig.model_validate(json.loads((directory / CONFIG_FILE).read_text()))
    return StageState(**raw), config
