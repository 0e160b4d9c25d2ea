"""The evaluator: a small image classifier trained on a dataset's own training shards.

Its accuracy on generated images is the class-consistency metric, and its
penultimate features stand in for Inception's in the Fréchet distance (no network
weights can be downloaded). One evaluator is trained per dataset and cached under
the sha256 of the dataset's manifest, as safetensors weights plus a JSON record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load, save
from torch import Tensor, nn

from data import storage
from data.frozen import FrozenConfig
from data.manifest import manifest_url
from data.reader import build_loader

FEATURES = 128


class EvaluatorConfig(FrozenConfig):
    image_channels: int = Field(ge=1)
    image_size: int = Field(ge=8)
    num_classes: int = Field(ge=1)
    steps: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(2e-3, gt=0.0)
    seed: int = 0


class EvaluatorNet(nn.Module):
    """Pixels [B, C, H, W] in [-1, 1] → logits [B, num_classes]; ``features`` gives the
    128-d penultimate activations used for the Fréchet distance."""

    def __init__(self, config: EvaluatorConfig):
        super().__init__()
        c = config.image_channels
        self.body = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, FEATURES, 3, padding=1),
            nn.BatchNorm2d(FEATURES),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(FEATURES, config.num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass
class Evaluator:
    config: EvaluatorConfig
    net: EvaluatorNet
    manifest_sha256: str
    heldout_accuracy: float

    @torch.no_grad()
    def predict(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted class ids [B] and features [B, 128] for pixels in [-1, 1]."""
        self.net.eval()
        features = self.net.features(pixels)
        return self.net.head(features).argmax(dim=1), features


def manifest_sha256(data_url: str) -> str:
    return hashlib.sha256(storage.read_bytes(manifest_url(data_url.rstrip("/")))).hexdigest()


def get_evaluator(data_url: str, cache_url: str, steps: int = 600) -> Evaluator:
    """The evaluator of ``data_url``: loaded from ``cache_url`` when one was trained for
    this exact manifest, else trained on its train split, measured on its val split,
    and cached."""
    sha = manifest_sha256(data_url)
    folder = storage.join(cache_url.rstrip("/"), sha)
    record_url = storage.join(folder, "evaluator.json")
    if storage.stat(record_url) is not None:
        record = json.loads(storage.read_bytes(record_url))
        config = EvaluatorConfig.model_validate(record["config"])
        net = EvaluatorNet(config)
        net.load_state_dict(load(storage.read_bytes(storage.join(folder, "evaluator.safetensors"))))
        return Evaluator(config, net.eval(), sha, record["heldout_accuracy"])
    evaluator = train_evaluator(data_url, sha, steps)
    weights = {k: v.contiguous() for k, v in evaluator.net.state_dict().items()}
    storage.write_bytes(storage.join(folder, "evaluator.safetensors"), save(weights))
    record = {
        "config": evaluator.config.model_dump(),
        "manifest_sha256": sha,
        "heldout_accuracy": evaluator.heldout_accuracy,
    }
    storage.write_bytes(record_url, json.dumps(record, indent=2).encode())
    return evaluator


def train_evaluator(data_url: str, sha: str, steps: int) -> Evaluator:
    """Train on the ``train`` split (random shifts of ±2 pixels), then measure on ``val``."""
    first = build_loader(data_url, "train", 0, 1, 64, seed=0, epoch=0, num_workers=0)
    manifest = first.manifest
    config = EvaluatorConfig(
        image_channels=manifest.channels,
        image_size=manifest.image_size,
        num_classes=manifest.num_classes,
        steps=steps,
    )
    torch.manual_seed(config.seed)
    net = EvaluatorNet(config)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, steps)
    step, epoch = 0, 0
    net.train()
    while step < steps:
        loader = build_loader(
            data_url, "train", 0, 1, config.batch_size, config.seed, epoch, num_workers=0
        )
        for x, y in loader:
            loss = F.cross_entropy(net(_shift(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step == steps:
                break
        epoch += 1
    evaluator = Evaluator(config, net.eval(), sha, 0.0)
    evaluator.heldout_accuracy = _accuracy(evaluator, data_url)
    return evaluator


def _shift(x: Tensor, pixels: int = 2) -> Tensor:
    """Random translation by up to ``pixels`` (zero padding), one shift per batch."""
    dx, dy = torch.randint(-pixels, pixels + 1, (2,)).tolist()
    padded = F.pad(x, (pixels, pixels, pixels, pixels), value=-1.0)
    h, w = x.shape[-2:]
    return padded[..., pixels + dy : pixels + dy + h, pixels + dx : pixels + dx + w]


def _accuracy(evaluator: Evaluator, data_url: str) -> float:
    correct = total = 0
    for x, y in iter_split(data_url, "val"):
        predicted, _ = evaluator.predict(x)
        correct += int((predicted == y).sum())
        total += len(y)
    return correct / max(total, 1)


def iter_split(data_url: str, split: str, batch_size: int = 250):
    """Every sample of a split in order, in batches (the last one may be smaller)."""
    loader = build_loader(
        data_url, split, 0, 1, 1, seed=0, epoch=0, num_workers=0, shuffle_buffer=0
    )
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
        if len(images) == batch_size:
            yield torch.cat(images), torch.cat(labels)
            images, labels = [], []
    if images:
        yield torch.cat(images), torch.cat(labels)
