"""Logging a trained model to MLflow, registering it, and loading it back.

A model version holds the weights as safetensors and their config as JSON under
the artifact ``weights/`` and a pyfunc entry logged as code; nothing in it is
unpickled when it is loaded.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from training.latent_diffusion import LatentDiffusion
from training.mlflow.model_uri import parse_model_uri

PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")
WEIGHTS_ARTIFACT = "weights"
PIP_REQUIREMENTS = ["torch", "safetensors", "pydantic>=2", "numpy", "pandas"]
# Sampling settings of the pyfunc entry when the caller passes none.
DEFAULT_PARAMS = {
    "guidance_scale": 0.0,
    "classifier_scale": 0.0,
    "sampler": "ddim",
    "steps": 50,
    "eta": 0.0,
}

# Declared, not inferred: one row per image, int64 class ids and optional seeds in, uint8
# images [B, H, W, C] out, the sampling settings as params.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("long", "label"), ColSpec("long", "seed", required=False)]),
    outputs=Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, -1))]),
    params=ParamSchema(
        [
            ParamSpec(name, {float: "double", int: "long", str: "string"}[type(value)], value)
            for name, value in DEFAULT_PARAMS.items()
        ]
    ),
)
INPUT_EXAMPLE = pd.DataFrame({"label": np.array([3, 7]), "seed": np.array([0, 1])})


def log_model_version(
    model: LatentDiffusion,
    tracking_uri: str,
    run_id: str,
    model_name: str,
    alias: str = "candidate",
) -> ModelVersion:
    """Log ``model`` to the run, register a new version of ``model_name`` and point
    ``alias`` at it. Returns the registered version."""
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    with (
        tempfile.TemporaryDirectory() as tmp,
        mlflow.start_run(run_id=run_id),
        warnings.catch_warnings(),
    ):
        # MLflow compares the example's columns with a range, which pandas 3 deprecates
        # (mlflow/models/utils.py); nothing in the example is affected.
        warnings.filterwarnings("ignore", "Operation with range is deprecated")
        weights = model.save(Path(tmp) / WEIGHTS_ARTIFACT)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={WEIGHTS_ARTIFACT: str(weights)},
            signature=SIGNATURE,
            input_example=(INPUT_EXAMPLE, DEFAULT_PARAMS),
            pip_requirements=PIP_REQUIREMENTS,
        )
    version = mlflow.register_model(info.model_uri, model_name)
    client.set_registered_model_alias(model_name, alias, version.version)
    return client.get_model_version(model_name, version.version)


def load_model_version(model_uri: str, tracking_uri: str, device: str = "cpu") -> LatentDiffusion:
    """Rebuild a :class:`LatentDiffusion` from ``models:/NAME@ALIAS`` or ``models:/NAME/V``.

    The version is resolved with a client of ``tracking_uri`` and its artifacts are read
    from their storage location: MLflow's own ``models:/`` download resolves names in
    the process-wide default registry, which a Serve replica or a Ray worker never set.
    """
    name, version = resolve_model_version(model_uri, tracking_uri)
    location = MlflowClient(tracking_uri).get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location.rstrip('/')}/artifacts/{WEIGHTS_ARTIFACT}",
            dst_path=tmp,
            tracking_uri=tracking_uri,
        )
        return LatentDiffusion.load(local, device=device)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version ``name@alias`` points at; None when the model or the alias does not
    exist. A tracking server that does not answer is an error, never None."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def resolve_model_version(model_uri: str, tracking_uri: str) -> tuple[str, str]:
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` → (name, version)."""
    ref = parse_model_uri(model_uri)
    if ref.alias is None:
        return ref.name, str(ref.version)
    version = alias_version(MlflowClient(tracking_uri), ref.name, ref.alias)
    if version is None:
        raise LookupError(
            f"{ref.uri}: model {ref.name!r} has no alias @{ref.alias} (or does not exist); "
            "register it with 'ldm train' and point the alias with 'ldm promote'"
        )
    return ref.name, version
