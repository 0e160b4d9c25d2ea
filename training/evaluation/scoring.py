"""Evaluate a trained model against its dataset, with a fixed seed.

Metrics: class consistency (the evaluator's accuracy on class-conditional samples),
per-class accuracy, the Fréchet distance between evaluator features of the held-out
(val) images and of the samples, the autoencoder's reconstruction PSNR on the val
split, the sampling time per image, and the exposure bias (``exposure_bias``: the
network's noise prediction on its own DDIM chain against on noised val latents, see
``training.diffusion.exposure``; its curve over t is logged beside the metrics).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from mlflow import MlflowClient
from pydantic import Field
from tqdm import tqdm

from data.frozen import FrozenConfig
from training.diffusion.exposure import ExposureCurve, exposure_curve
from training.evaluation.evaluator import Evaluator, iter_split
from training.evaluation.metrics import frechet_distance, psnr
from training.images import make_grid, to_uint8
from training.latent_diffusion import LatentDiffusion
from training.mlflow.run_tracker import RunTracker
from training.names import SamplerName
from training.plots import exposure_plot, label_rows

GRID_PER_CLASS = 8


class EvaluationSettings(FrozenConfig):
    samples_per_class: int = Field(20, ge=2)
    guidance_scale: float = Field(2.0, ge=0.0)
    classifier_scale: float = Field(0.0, ge=0.0)
    sampler: SamplerName = "ddim"
    steps: int = Field(50, ge=1)
    eta: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = 0
    batch_size: int = Field(100, ge=1)
    eps_scaling: float = Field(
        1.0, ge=0.5, le=2.0, description="b of epsilon scaling ε̂ / (b + k·t/T); 1: off"
    )
    eps_scaling_slope: float = Field(0.0, ge=-1.0, le=1.0, description="k of the same")
    exposure_samples: int = Field(
        100, ge=0, description="val images the exposure-bias curve is measured on (0: none)"
    )


@dataclass
class EvaluationReport:
    metrics: dict[str, float]
    grid: np.ndarray  # uint8 [H, W, C]: one row per class
    exposure: ExposureCurve | None = None


@torch.no_grad()
def evaluate_model(
    model: LatentDiffusion,
    data_url: str,
    evaluator: Evaluator,
    settings: EvaluationSettings,
    progress: str | None = None,
) -> EvaluationReport:
    """Sample ``samples_per_class`` images of every class and measure them. With
    ``progress`` (its label), a progress bar on an interactive stderr."""
    classes = model.config.num_classes
    labels = torch.arange(classes).repeat_interleave(settings.samples_per_class)
    started = time.perf_counter()
    batches = tqdm(
        range(0, len(labels), settings.batch_size),
        desc=progress,
        unit="batch",
        file=sys.stderr,
        disable=None if progress else True,  # None: shown only on a terminal
    )
    pixels = torch.cat(
        [
            model.sample(
                labels[i : i + settings.batch_size],
                guidance_scale=settings.guidance_scale,
                classifier_scale=settings.classifier_scale,
                sampler=settings.sampler,
                steps=settings.steps,
                eta=settings.eta,
                eps_scaling=settings.eps_scaling,
                eps_scaling_slope=settings.eps_scaling_slope,
                generator=[
                    torch.Generator().manual_seed(settings.seed * 1_000_003 + j)
                    for j in range(i, min(i + settings.batch_size, len(labels)))
                ],
            )
            for i in batches
        ]
    )
    seconds_per_image = (time.perf_counter() - started) / len(labels)
    predicted, sample_features = evaluator.predict(pixels)
    correct = predicted == labels
    metrics = {
        "class_consistency": correct.float().mean().item(),
        "fd": frechet_distance(_real_features(evaluator, data_url), sample_features.numpy()),
        "psnr": _reconstruction_psnr(model, data_url),
        "seconds_per_image": seconds_per_image,
        "evaluator_accuracy": evaluator.heldout_accuracy,
    }
    for k in range(classes):
        metrics[f"accuracy_class_{k}"] = correct[labels == k].float().mean().item()
    exposure = _exposure(model, data_url, settings)
    if exposure is not None:
        metrics["exposure_bias"] = exposure.summary
    per_class = pixels.reshape(classes, settings.samples_per_class, *pixels.shape[1:])
    shown = per_class[:, :GRID_PER_CLASS].reshape(-1, *pixels.shape[1:])
    grid = make_grid(to_uint8(shown), ncols=min(GRID_PER_CLASS, settings.samples_per_class))
    names = model.config.class_names or tuple(str(k) for k in range(classes))
    return EvaluationReport(metrics, label_rows(grid, names), exposure)


def _exposure(
    model: LatentDiffusion, data_url: str, settings: EvaluationSettings
) -> ExposureCurve | None:
    """The exposure-bias curve on the first ``exposure_samples`` val images, along a
    DDIM chain of the evaluation's step count."""
    if settings.exposure_samples == 0:
        return None
    x, y = next(iter_split(data_url, "val", batch_size=settings.exposure_samples))
    z0 = model.autoencoder.encode_latents(x)
    labels = y if model.config.num_classes > 1 else None
    generator = torch.Generator().manual_seed(settings.seed)
    return exposure_curve(model.denoiser, model.diffusion, z0, labels, settings.steps, generator)


def _real_features(evaluator: Evaluator, data_url: str) -> np.ndarray:
    return np.concatenate([evaluator.predict(x)[1].numpy() for x, _ in iter_split(data_url, "val")])


def _reconstruction_psnr(model: LatentDiffusion, data_url: str) -> float:
    originals, reconstructions = [], []
    for x, _ in iter_split(data_url, "val"):
        originals.append(x)
        reconstructions.append(model.autoencoder.decode(model.autoencoder.encode(x)[0]))
    return psnr(torch.cat(originals), torch.cat(reconstructions))


def log_evaluation(
    report: EvaluationReport,
    settings: EvaluationSettings,
    tracking_uri: str,
    model_name: str,
    version: str,
) -> None:
    """Metrics (``eval/…``) and the grid to the version's run; metrics and settings as
    tags (``eval.…``) on the model version."""
    client = MlflowClient(tracking_uri)
    model_version = client.get_model_version(model_name, version)
    if model_version.run_id:
        with RunTracker(tracking_uri, model_version.run_id) as tracker:
            tracker.log_metrics({f"eval/{k}": v for k, v in report.metrics.items()}, step=0)
            tracker.log_image(report.grid, f"eval/samples_v{version}.png")
            if report.exposure is not None:  # a chart over t in the MLflow UI, and a plot
                for t, ratio in zip(report.exposure.timesteps, report.exposure.ratio, strict=True):
                    tracker.log_metrics({f"eval/exposure_ratio_v{version}": ratio}, step=t)
                tracker.log_image(exposure_plot(report.exposure), f"eval/exposure_v{version}.png")
    tags = {f"eval.{k}": f"{v:.6g}" for k, v in report.metrics.items()}
    if report.exposure is not None:
        curve = zip(report.exposure.timesteps, report.exposure.ratio, strict=True)
        tags["eval.exposure_ratio"] = json.dumps([[t, round(r, 4)] for t, r in curve])
    tags["eval.settings"] = settings.model_dump_json()
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
