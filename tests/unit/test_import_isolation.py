"""The math and the networks load without any service client."""

import subprocess
import sys


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
