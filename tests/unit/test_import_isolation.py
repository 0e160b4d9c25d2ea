"""The math and the networks load without any service client."""

import subprocess
import sys

import pytest


def test_math_and_models_import_without_ray_mlflow_prefect():
    code = (
        "import sys, training.diffusion, training.models\n"
        "loaded = sorted(m for m in ('ray', 'mlflow', 'prefect', 'boto3', 'webdataset')"
        " if m in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_math_imports_only_torch_and_numpy():
    code = (
        "import sys, torch, numpy\n"
        "before = set(sys.modules)\n"
        "import training.diffusion\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(','.join(sorted(new - set(sys.stdlib_module_names) - {'training'})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


# What each package must never load, whichever of its modules is imported (the design's
# "which service runs where": a Serve replica has no Ray Train or Prefect, a data reader
# on a Ray worker has no MLflow).
FORBIDDEN = {
    "training.diffusion": ("ray", "mlflow", "prefect"),
    "serving": ("ray.train", "prefect"),
    "data": ("ray.train", "mlflow", "prefect"),
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_every_module_of_a_package_keeps_out_what_it_must_not_load(package):
    code = (
        "import importlib, pkgutil, sys\n"
        f"root = importlib.import_module({package!r})\n"
        "names = [m.name for m in pkgutil.walk_packages(root.__path__, root.__name__ + '.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        f"print(len(names), *[m for m in {FORBIDDEN[package]!r} if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    count, *loaded = result.stdout.split()
    assert int(count) >= 1  # the walk found the package's modules
    assert loaded == []


def test_the_command_line_builds_its_options_without_torch_or_a_service_client():
    """``ldm --help`` and a typo in an option answer at once: the choices come from
    ``training.names``, not from the modules that use them."""
    code = (
        "import sys\n"
        "from flows.cli import build_parser\n"
        "build_parser()\n"
        "print(*[m for m in ('torch', 'ray', 'mlflow', 'prefect') if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_the_pyfunc_entry_of_versions_registered_before_the_move_still_imports():
    """What ``artifacts/mlflow_pyfunc.py`` of an older model version imports."""
    code = (
        "from training.pipeline import LatentDiffusion\n"
        "from training.registry import DEFAULT_PARAMS\n"
        "import training.latent_diffusion as home\n"
        "print(LatentDiffusion is home.LatentDiffusion, sorted(DEFAULT_PARAMS)[0])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["True", "classifier_scale"]
