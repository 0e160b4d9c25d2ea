"""The ldm command line: help, the in-process demo, errors that say what to fix."""

import subprocess
import sys

import numpy as np
from PIL import Image


def _ldm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_help_lists_every_command():
    result = _ldm("--help")
    assert result.returncode == 0
    for name in [
        "demo",
        "shard",
        "train",
        "evaluate",
        "promote",
        "rollback",
        "serve",
        "sample",
        "retrain",
        "schedule",
        "up",
        "down",
    ]:
        assert name in result.stdout


def test_version_is_the_installed_package_version():
    from importlib.metadata import version

    result = _ldm("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ldm {version('ldm-pipeline')}"


def test_demo_with_tiny_preset_writes_a_grid_and_a_model(tmp_path):
    result = _ldm("demo", "--preset", "tiny", "--out", str(tmp_path), "--no-progress")
    assert result.returncode == 0, result.stderr
    grid_path = tmp_path / "samples.png"
    assert f"sample grid: {grid_path}" in result.stdout
    grid = np.asarray(Image.open(grid_path))
    # 10 rows (digits) × 8 columns of 32×32 images with 2-pixel padding.
    assert grid.shape == (10 * 34 + 2, 8 * 34 + 2)
    assert (tmp_path / "model" / "config.json").is_file()
    curves = np.asarray(Image.open(tmp_path / "loss.png"))
    assert f"loss curves: {tmp_path / 'loss.png'}" in result.stdout
    assert curves.ndim == 3 and curves.shape[1] > 2 * curves.shape[0]  # a panel per stage
    assert curves.std() > 10  # drawn, not blank


def test_train_without_a_dataset_says_which_url_is_missing(tmp_path):
    result = _ldm("train", str(tmp_path / "nothing-here"), "--preset", "tiny")
    assert result.returncode == 1
    assert "ldm train: error" in result.stderr
    assert str(tmp_path / "nothing-here") in result.stderr


def test_train_refuses_a_missing_init_from_version_before_reaching_for_ray(tmp_path):
    """No Ray listens at RAY_ADDRESS: the error is the missing version, found first."""
    import os

    from data.manifest import ShardOptions
    from data.shard import shard_dataset

    rng = np.random.default_rng(0)
    for i in range(20):
        path = tmp_path / "images" / f"class{i % 2}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(path)
    options = ShardOptions(image_size=16, channels=1, val_fraction=0.2, seed=1)
    shard_dataset(str(tmp_path / "images"), str(tmp_path / "shards"), options, progress=False)
    env = os.environ | {"RAY_ADDRESS": "127.0.0.1:1", "LDM_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", str(tmp_path / "shards"), "--preset", "tiny"]
        + ["--init-from", "models:/nosuch@champion"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "model 'nosuch' has no alias @champion" in result.stderr
    assert "Ray" not in result.stderr.splitlines()[-1]
