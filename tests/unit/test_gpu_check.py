"""The GPU check script runs end to end (on the CPU, tiny preset) and reports what it
promises; its peak table resolves the GPU names CUDA reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_check import peak_tflops

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_peak_table_matches_cuda_device_names():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L40S") == 362.0  # not L4's figure
    assert peak_tflops("Some Future GPU") is None


def test_runs_the_denoiser_step_and_reports_throughput_and_flops(tmp_path):
    out = tmp_path / "check.json"
    args = [
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--modes",
        "eager",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--peak-tflops",
        "1",
        "--json",
        str(out),
    ]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["preset"] == "tiny" and report["latent_shape"] == [4, 8, 8]
    (result,) = report["results"]
    assert result["mode"] == "eager" and result["steps"] == 4 and result["batch_size"] == 16
    assert result["images_per_s"] > 0 and result["gflops_per_step"] > 0
    assert 0 < result["mfu"] < 1
    assert result["loss_first"] > 0 and result["loss_last"] > 0


def test_unknown_mode_is_refused_with_the_choices():
    args = ["--device", "cpu", "--preset", "tiny", "--modes", "fast"]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert done.returncode == 2
    assert "use eager or compile" in done.stdout
