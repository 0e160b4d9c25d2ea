"""The training-job options that ``ldm train``, ``ldm retrain`` and ``ldm schedule``
share: one name, one meaning and one default each (the defaults of
:class:`training.job.JobSettings`, and :data:`training.names.DEFAULT_CPUS_PER_WORKER`).

``ldm train`` reads them as a whole job; ``ldm retrain`` only lets the ones given
override its config file (so there they parse to None when absent, and the help text
still shows the default the config starts from). ``--set PATH=VALUE`` reaches every
other field of a retrain config.
"""

from __future__ import annotations

import argparse
from typing import Any

from training.names import DEFAULT_CPUS_PER_WORKER

# dest → (flag, default, argparse arguments, help); dest is the JobSettings field
# (scaling's fields under their own names).
_OPTIONS: dict[str, tuple[str, Any, dict[str, Any], str]] = {
    "num_workers": (
        "--workers",
        1,
        {"type": int, "metavar": "N"},
        "Ray Train workers per stage, data-parallel",
    ),
    "cpus_per_worker": (
        "--cpus-per-worker",
        DEFAULT_CPUS_PER_WORKER,
        {"type": float, "metavar": "CPUS"},
        "CPUs each worker reserves; also its torch threads",
    ),
    "use_gpu": (
        "--gpu",
        False,
        {"action": argparse.BooleanOptionalAction},
        "one GPU per worker (NCCL, bf16 autocast)",
    ),
    "storage_url": (
        "--storage",
        None,
        {"metavar": "URL"},
        "absolute folder or s3://bucket/prefix for checkpoints and latent caches "
        "(default: LDM_HOME/runs)",
    ),
    "run_name": (
        "--run-name",
        None,
        {"metavar": "NAME"},
        "name of the run; the same name resumes it (default: PRESET-DATE-TIME)",
    ),
    "experiment": ("--experiment", "ldm", {"metavar": "NAME"}, "MLflow experiment"),
    "model_name": ("--model-name", "ldm", {"metavar": "NAME"}, "registered model name in MLflow"),
    "tracking_uri": (
        "--tracking-uri",
        None,
        {"metavar": "URI"},
        "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite under LDM_HOME)",
    ),
    "checkpoint_every": (
        "--checkpoint-every",
        200,
        {"type": int, "metavar": "STEPS"},
        "steps between checkpoints",
    ),
    "mlflow_checkpoints": (
        "--mlflow-checkpoints",
        "last:2",
        {"metavar": "last:K|final|all"},
        "checkpoints each stage logs to its MLflow run under checkpoints/STAGE/step-N/: "
        "the K newest, the final one only, or every one",
    ),
    "max_failures": (
        "--max-failures",
        1,
        {"type": int, "metavar": "N"},
        "worker-group restarts from the last checkpoint",
    ),
    "verbose": (
        "--verbose",
        False,
        {"action": argparse.BooleanOptionalAction},
        "Ray Train's and MLflow's own INFO logs on the console, beside the progress lines",
    ),
}
SCALING_FIELDS = ("num_workers", "cpus_per_worker", "use_gpu")


def add_job_options(parser: argparse.ArgumentParser, with_defaults: bool) -> None:
    """The shared options; ``with_defaults=False`` parses absent ones to None."""
    for dest, (flag, default, extra, text) in _OPTIONS.items():
        if default is None:
            shown = ""  # the text says it
        elif isinstance(default, bool):
            shown = f" (default: {'--' if default else '--no-'}{flag.removeprefix('--')})"
        else:
            shown = f" (default: {default:g})" if isinstance(default, float) else ""
            shown = shown or f" (default: {default})"
        parser.add_argument(
            flag, dest=dest, default=default if with_defaults else None, help=text + shown, **extra
        )


def job_option_paths() -> dict[str, tuple[str, ...]]:
    """dest → where the option goes in a RetrainConfig."""
    return {
        dest: ("train", "scaling", dest) if dest in SCALING_FIELDS else ("train", dest)
        for dest in _OPTIONS
    }


def scaling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {dest: getattr(args, dest) for dest in SCALING_FIELDS}


def job_fields_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The JobSettings/TrainSettings fields of ``ldm train``'s shared options."""
    return {dest: getattr(args, dest) for dest in _OPTIONS if dest not in SCALING_FIELDS}
