"""A loss that becomes inf or NaN stops training with the stage and the first bad step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.local import train_in_process
from training.optimisation import FiniteLossGuard, NonFiniteLoss
from training.presets import get_preset


def test_the_guard_remembers_the_first_bad_step_only():
    guard = FiniteLossGuard(torch.device("cpu"))
    for step, loss in enumerate([0.5, 0.4, float("nan"), 0.3, float("inf")], start=1):
        guard.observe(torch.tensor(loss), step)
    assert guard.first_bad_step() == 3
    assert FiniteLossGuard(torch.device("cpu")).first_bad_step() is None


def test_an_exploding_stage_stops_in_process_naming_the_stage_and_step():
    config = get_preset("tiny").for_data(32, 1, 10)
    exploding = config.denoiser_training.model_copy(update={"learning_rate": 1e30})
    config = config.model_copy(update={"denoiser_training": exploding})
    images = np.random.default_rng(0).integers(0, 255, (64, 32, 32), dtype=np.uint8)
    with pytest.raises(NonFiniteLoss, match="denoiser stage's loss is not finite") as caught:
        train_in_process(config, images, np.arange(64) % 10, progress=False, log=lambda s: None)
    assert caught.value.stage == "denoiser" and 1 < caught.value.step <= 5
