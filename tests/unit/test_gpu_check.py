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


def test_runs_each_stage_and_reports_throughput_and_flops(tmp_path):
    out = tmp_path / "check.json"
    args = [
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--runs",
        "denoiser:eager,autoencoder:eager_cl,encode:eager@32,denoiser:graph_cl_host",
        "--profile",
        "denoiser:eager",
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
    denoiser, autoencoder, encode, host = report["results"]
    assert denoiser["run"] == "denoiser:eager" and denoiser["steps"] == 4
    assert denoiser["batch_size"] == 16  # the preset's
    for result in (denoiser, autoencoder, encode, host):
        assert "error" not in result, result
        assert result["images_per_s"] > 0 and result["gflops_per_step"] > 0
        assert 0 < result["mfu"] < 1
    assert denoiser["loss_first"] > 0 and denoiser["loss_last"] > 0
    assert autoencoder["stage"] == "autoencoder" and autoencoder["loss_last"] > 0
    # encoding is a forward pass only: fewer FLOPs per image than a training step
    assert encode["batch_size"] == 32 and "loss_last" not in encode
    assert encode["gflops_per_step"] / 32 < autoencoder["gflops_per_step"] / 16
    top = denoiser["profile"]["top"]
    assert top and all(row["ms_per_step"] > 0 for row in top)
    assert host["loss_last"] > 0  # batches cut on the host reach the step


def test_unknown_run_is_refused_with_the_choices():
    args = ["--device", "cpu", "--preset", "tiny", "--runs", "denoiser:fast"]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert done.returncode == 2
    assert "write stage:mode[@batch]" in done.stdout and "graph_cl" in done.stdout


SERVE_SCRIPT = SCRIPT.with_name("gpu_serve_check.py")


def test_the_serving_check_reports_each_mode_on_the_cpu(tmp_path):
    """Every field the GPU run records, from a smoke run: throughput in this process and
    through the engine, and the reproducibility of each mode (0 on the CPU)."""
    out = tmp_path / "serve.json"
    args = ["--device", "cpu", "--preset", "tiny", "--concurrency", "1", "--steps", "2"]
    args += ["--width", "16"]
    args += ["--modes", "fp32_invariant", "fp32_strict", "--json", str(out)]
    args += ["--latency-modes", "fp32_invariant", "--latency-clients", "3"]
    args += ["--latency-seconds", "1"]
    subprocess.run([sys.executable, str(SERVE_SCRIPT), *args], check=True, timeout=300)
    invariant, strict = json.loads(out.read_text())
    assert (invariant["mode"], strict["mode"]) == ("fp32_invariant", "fp32_strict")
    assert invariant["images_per_s"]["1"] > 0 and invariant["engine_images_per_s"]["1"] > 0
    assert strict["engine_images_per_s"] is None  # no engine setting gives it
    latency = invariant["mixed_latency"]  # the three clients' first requests: 20, 20, 50 steps
    assert latency["requests"] >= 3 and set(latency["p50_p99_s_by_steps"]) >= {"20", "50"}
    for p50, p99 in latency["p50_p99_s_by_steps"].values():
        assert 0 < p50 <= p99
    assert latency["short_p50_alone_s"] > 0 and latency["short_p50_same_width_s"] > 0
    assert "mixed_latency" not in strict
    for row in (invariant, strict):
        assert row["mixed_vs_alone"] == {"max_levels": 0, "share_differing": 0.0}
        assert row["vs_fp32"]["max_levels"] <= 1


def test_the_job_checks_budgets_are_a_valid_model_of_the_preset():
    from benchmarks.gpu_job_check import budgets, synthetic_images
    from training.config import LDMConfig
    from training.presets import over_preset

    model = LDMConfig.model_validate(over_preset(budgets("base", 600), "demo"))
    assert model.preset == "base" and model.image_size == 64
    assert model.denoiser_training.steps == 600 and model.denoiser_training.log_every == 50
    assert model.autoencoder_training.steps == model.classifier_training.steps == 120
    assert model.denoiser_training.cuda_graph and model.denoiser_training.compile  # base's
    data = synthetic_images(20, 64, 3, 10, seed=0)
    assert data["images"].shape == (20, 64, 64, 3) and data["images"].dtype.name == "uint8"
    assert set(data["labels"]) <= set(range(10)) and len(data["class_names"]) == 10
    assert synthetic_images(4, 32, 1, 10, seed=0)["images"].shape == (4, 32, 32)


def test_the_job_bundle_packs_the_jobs_requirements_less_the_images(tmp_path):
    from benchmarks.gpu_bundle import image_packages, job_requirements

    requirements = job_requirements(SCRIPT.parents[1] / "pyproject.toml")
    names = {r.split("[")[0].split("=")[0].split(">")[0].split("<")[0] for r in requirements}
    assert {"mlflow", "webdataset", "pydantic", "safetensors"} <= names
    assert not names & {"torch", "prefect", "boto3", "mlxtend"}
    assert any(r.startswith("ray[default,train]==") for r in requirements)
    listed = tmp_path / "packages.txt"
    listed.write_text("# the image\nPyYAML\ntyping_extensions==4.12.0\n\nnvidia.ml-py\n")
    assert image_packages(listed) == {"pyyaml", "typing-extensions", "nvidia-ml-py"}


def test_the_jobs_denoiser_speed_is_read_against_the_bare_step_of_the_same_preset(tmp_path):
    from benchmarks.gpu_job_check import share_of_bare_step

    bare = tmp_path / "train.json"
    runs = [
        {"run": "denoiser:graph_compile_cl@1024", "images_per_s": 11409.0},
        {"run": "denoiser:graph_compile_cl", "images_per_s": 7803.0},
    ]
    bare.write_text(json.dumps({"preset": "base", "results": runs}))
    job = {"preset": "base", "stages": {"denoiser": {"images_per_s": 6242.4}}}
    assert share_of_bare_step(job, bare) == 0.8
    assert share_of_bare_step({**job, "preset": "demo"}, bare) is None
    bare.write_text(json.dumps({"preset": "base", "results": runs[:1]}))
    assert share_of_bare_step(job, bare) is None
