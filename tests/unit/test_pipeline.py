"""In-process training of the tiny preset, saving, loading and sampling."""

import numpy as np
import pytest
import torch

from data.reader import to_pixels
from training.images import make_grid, to_uint8
from training.latent_diffusion import LatentDiffusion
from training.local import train_in_process
from training.presets import get_preset


def _blobs(n: int = 64, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes of synthetic images: a bright square top-left or bottom-right."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 30, (n, size, size), dtype=np.uint8)
    labels = np.arange(n) % 2
    half = size // 2
    images[labels == 0, :half, :half] = 220
    images[labels == 1, half:, half:] = 220
    return images, labels


@pytest.fixture(scope="module")
def trained() -> LatentDiffusion:
    images, labels = _blobs()
    config = get_preset("tiny").for_data(32, 1, 2)
    return train_in_process(config, images, labels, progress=False, log=lambda _: None)


def test_training_sets_the_latent_scale_factor(trained):
    images, _ = _blobs()
    scale = trained.config.autoencoder.scale_factor
    assert scale != 1.0 and trained.autoencoder.config.scale_factor == scale
    with torch.no_grad():
        z0 = trained.autoencoder.encode_latents(to_pixels(images))
    assert z0.std().item() == pytest.approx(1.0, rel=1e-3)


def test_saved_model_reloads_and_samples_identically(trained, tmp_path):
    trained.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json",
        "autoencoder.safetensors",
        "denoiser.safetensors",
        "classifier.safetensors",
    }
    loaded = LatentDiffusion.load(tmp_path)
    assert loaded.config == trained.config
    y = torch.tensor([0, 1, 1])
    kwargs = dict(guidance_scale=1.0, classifier_scale=1.0, sampler="ddim", steps=5)
    a = trained.sample(y, generator=torch.Generator().manual_seed(4), **kwargs)
    b = loaded.sample(y, generator=torch.Generator().manual_seed(4), **kwargs)
    assert a.shape == (3, 1, 32, 32) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_of_a_folder_without_config_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved model folder"):
        LatentDiffusion.load(tmp_path)


def test_training_rejects_mismatched_images():
    images, labels = _blobs(size=16)
    with pytest.raises(ValueError, match="the config expects"):
        train_in_process(get_preset("tiny").for_data(32, 1, 2), images, labels, progress=False)
    images, labels = _blobs()
    with pytest.raises(ValueError, match="one label in 0 … 1"):
        train_in_process(get_preset("tiny").for_data(32, 1, 2), images, labels + 1, progress=False)


def test_pixel_conversions_round_trip():
    images, _ = _blobs(n=4)
    pixels = to_pixels(images)
    assert pixels.shape == (4, 1, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    np.testing.assert_array_equal(to_uint8(pixels)[..., 0], images)
    assert make_grid(to_uint8(pixels), ncols=2, padding=2).shape == (70, 70, 1)
