"""Resumable training state of one stage, written to a folder that Ray Train uploads
(and that rank 0 logs to the MLflow run, see :mod:`training.mlflow.checkpoint_upload`).

Safetensors and JSON only, so loading a checkpoint cannot run code:

- ``model.safetensors``: the network's weights; ``ema.safetensors``: its EMA weights
  (stages that keep one);
- ``optimizer.safetensors``: the optimiser's tensors (AdamW's moments and step counts),
  keyed ``<parameter index>.<name>``;
- ``state.json``: stage, step, data epoch and batches read in it, the optimiser's
  parameter groups and non-tensor state, the learning-rate scheduler's state, the
  MLflow run that wrote it;
- ``config.json``: the model config the stage was built with (with what the stage
  measured, e.g. the latent scale, in its final checkpoint).

Checkpoints written before this format (one ``state.pt``) are still read, with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file, save, save_file

from data import storage
from training.config import LDMConfig
from training.models import Autoencoder

STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
LEGACY_STATE_FILE = "state.pt"


# A checkpoint logged to MLflow, as ``ldm train --resume-from`` takes it.
RUNS_CHECKPOINT_URI = re.compile(
    r"^runs:/(?P<run>[0-9a-f]{32})/(?P<path>checkpoints/(?P<stage>[a-z]+)/step-(?P<step>\d{7}))/?$"
)


def checkpoint_artifact_path(stage: str, step: int) -> str:
    """Where a stage's checkpoint at ``step`` lies among its MLflow run's artifacts."""
    return f"checkpoints/{stage}/step-{step:07d}"


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
    run_id: str | None = None  # the MLflow run that wrote it


def save_checkpoint(directory: str | Path, state: StageState, config: LDMConfig) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, optimizer_json = _split_optimizer(state.optimizer)
    record = {
        "stage": state.stage,
        "step": state.step,
        "epoch": state.epoch,
        "batches_into_epoch": state.batches_into_epoch,
        "optimizer": optimizer_json,
        "scheduler": _numbers(state.scheduler),
        "has_ema": state.ema is not None,
        "run_id": state.run_id,
    }
    text = json.dumps(record, indent=2)  # fails here, before any file, if not plain data
    save_file(_plain(state.model), str(directory / MODEL_FILE))
    if state.ema is not None:
        save_file(_plain(state.ema), str(directory / EMA_FILE))
    save_file(tensors, str(directory / OPTIMIZER_FILE))
    (directory / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
    (directory / STATE_FILE).write_text(text)  # last: a folder with it is complete
    return directory


def _plain(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, one storage each, as safetensors stores them."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser's state_dict as (tensors by "<index>.<name>", the rest as JSON data)."""
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                other.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": _numbers(state["param_groups"]), "state": other}


def _numbers(data: Any) -> Any:
    """``data`` with each tensor (a learning rate kept on the GPU for a CUDA graph) as
    the number or list it holds."""
    if isinstance(data, torch.Tensor):
        return data.tolist()
    if isinstance(data, dict):
        return {key: _numbers(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return type(data)(_numbers(value) for value in data)
    return data


def _join_optimizer(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {
        int(index): dict(values) for index, values in data["state"].items()
    }
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    return {"state": state, "param_groups": data["param_groups"]}


def save_weights(url: str, weights: dict[str, torch.Tensor]) -> None:
    """One network's weights as a safetensors file at ``url`` (a path or ``s3://``)."""
    storage.write_bytes(url, save(_plain(weights)))


def load_weights(url: str) -> dict[str, torch.Tensor]:
    """The weights :func:`save_weights` wrote, on the CPU."""
    return load(storage.read_bytes(url))


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
    config_path = directory / CONFIG_FILE
    if (directory / STATE_FILE).is_file():
        record = json.loads((directory / STATE_FILE).read_text())
        ema = load_file(str(directory / EMA_FILE)) if record["has_ema"] else None
        state = StageState(
            stage=record["stage"],
            step=record["step"],
            epoch=record["epoch"],
            batches_into_epoch=record["batches_into_epoch"],
            model=load_file(str(directory / MODEL_FILE)),
            optimizer=_join_optimizer(
                load_file(str(directory / OPTIMIZER_FILE)), record["optimizer"]
            ),
            scheduler=record["scheduler"],
            ema=ema,
            run_id=record.get("run_id"),
        )
    elif (directory / LEGACY_STATE_FILE).is_file():
        raw = torch.load(directory / LEGACY_STATE_FILE, map_location="cpu", weights_only=True)
        state = StageState(**raw)
    else:
        raise FileNotFoundError(
            f"{directory} is not a stage checkpoint folder (no {STATE_FILE} or {LEGACY_STATE_FILE})"
        )
    config = LDMConfig.model_validate(json.loads(config_path.read_text()))
    return state, config
