"""The MLflow pyfunc entry of a registered model, logged as code (no pickle).

``mlflow.pyfunc.load_model("models:/NAME@ALIAS")`` runs this file, which rebuilds
the networks from the model's ``weights`` artifact (safetensors + config.json).
Input: a DataFrame with an int column ``label`` (class id, one row per image) and
an optional int column ``seed`` (per-image noise seed, default the row index).
Params: ``guidance_scale``, ``classifier_scale``, ``sampler``, ``steps``, ``eta``.
Output: uint8 images [B, H, W, C].
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from training.mlflow.registry import DEFAULT_PARAMS


class LatentDiffusionSampler(PythonModel):
    def load_context(self, context) -> None:
        from training.latent_diffusion import LatentDiffusion

        self.model = LatentDiffusion.load(context.artifacts["weights"])

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        import torch

        from training.images import to_uint8

        settings = DEFAULT_PARAMS | (params or {})
        labels = torch.from_numpy(np.array(model_input["label"], dtype=np.int64))
        if "seed" in model_input:
            seeds = [int(s) for s in model_input["seed"]]
        else:
            seeds = list(range(len(labels)))
        pixels = self.model.sample(
            labels,
            guidance_scale=float(settings["guidance_scale"]),
            classifier_scale=float(settings["classifier_scale"]),
            sampler=str(settings["sampler"]),
            steps=int(settings["steps"]),
            eta=float(settings["eta"]),
            generator=[torch.Generator().manual_seed(s) for s in seeds],
        )
        return to_uint8(pixels)


mlflow.models.set_model(LatentDiffusionSampler())
