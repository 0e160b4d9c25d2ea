"""``ldm train``: the three training stages as Ray Train jobs, registered in MLflow."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import get_args

from flows.cli.job_options import add_job_options, job_fields_from_args, scaling_from_args
from training.names import PresetName


def train_settings_from_args(args: argparse.Namespace):  # -> training.job.TrainSettings
    """The TrainSettings of ``ldm train``'s options (the same type a retrain config's
    ``train`` is). ValueError/ValidationError if invalid."""
    from flows.cli.config_files import read_config_file
    from training.config import LDMConfig
    from training.job import ScalingSettings, TrainSettings
    from training.presets import over_preset

    model = None
    if args.config:
        model = LDMConfig.model_validate(
            over_preset(read_config_file(Path(args.config)), args.preset)
        )
    return TrainSettings(
        preset=args.preset,
        model=model,
        scaling=ScalingSettings(**scaling_from_args(args)),
        resume_from=args.resume_from,
        init_from=args.init_from,
        reuse_autoencoder=args.reuse_autoencoder,
        **job_fields_from_args(args),
    )


def _train(args: argparse.Namespace) -> int:
    from data.storage import StorageError
    from flows.cli.config_files import config_error

    try:
        job = train_settings_from_args(args).job(args.data_url)
    except ValueError as error:  # a ValidationError is a ValueError
        return config_error("ldm train", error)
    from flows.local_stack import unused_stack_note
    from training.job import default_local_store
    from training.progress import quiet_libraries
    from training.ray.submit import train_job

    if note := unused_stack_note(default_local_store(), os.environ.get("RAY_ADDRESS")):
        print(note, file=sys.stderr)
    quiet_libraries(job.verbose)

    try:
        result = train_job(job, os.environ.get("RAY_ADDRESS"))
    except (ValueError, StorageError, OSError, RuntimeError) as error:
        print(f"ldm train: error: {error}", file=sys.stderr)
        return 1
    checkpoints = ", ".join(f"{k}: {v}" for k, v in result.checkpoints.items())
    parent = f", fine-tuned from version {result.parent_version}" if result.parent_version else ""
    print(
        f"Trained run '{job.run_name}' (MLflow run {result.run_id} at {job.tracking_uri}); "
        f"registered {result.model_name} version {result.version} as @candidate{parent}. "
        f"Checkpoints: {checkpoints}."
    )
    return 0


def add_train_command(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train the autoencoder, denoiser and classifier as Ray Train jobs",
        description="Train the KL autoencoder, cache the training latents, train the "
        "DDPM-IP latent denoiser (with EMA and label dropout for classifier-free guidance) "
        "and the noisy-latent classifier, each as a Ray Train job on the cluster at "
        "RAY_ADDRESS (or a local Ray). Logs params, metrics and sample grids to MLflow "
        "(MLFLOW_TRACKING_URI, default a sqlite file under LDM_HOME or ./outputs) and "
        "registers the model with alias @candidate. Re-running with the same --run-name "
        "resumes every stage from its latest checkpoint.",
    )
    train.add_argument(
        "data_url",
        metavar="DATA_URL",
        help="dataset folder or s3:// prefix written by 'ldm shard' (or its manifest.json)",
    )
    source = train.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        choices=get_args(PresetName),
        default="demo",
        help="model sizes and training lengths (default: demo)",
    )
    source.add_argument(
        "--config",
        metavar="FILE",
        help="a JSON or YAML model config (the 'model' of a job) instead of a preset: the "
        "fields it leaves out are those of the preset its 'preset' field names (default "
        "demo), e.g. 'denoiser: {num_res_blocks: 2}'",
    )
    add_job_options(train, with_defaults=True)
    train.add_argument(
        "--resume-from",
        metavar="URI",
        help="continue a stage from a checkpoint, in a new run: "
        "runs:/RUN_ID/checkpoints/STAGE/step-N (as logged to MLflow) or a checkpoint "
        "folder in storage; the stages before it are taken from the run that wrote it, "
        "the step budgets from this command",
    )
    train.add_argument(
        "--init-from",
        metavar="MODEL_URI",
        help="start every network from a registered version's weights "
        "(models:/NAME@champion or models:/NAME/VERSION) and fine-tune each stage for "
        "this command's step budgets; the run and the new version are tagged "
        "ldm.parent_version",
    )
    train.add_argument(
        "--reuse-autoencoder",
        action="store_true",
        help="with --init-from: keep the version's autoencoder and latent scale and skip "
        "the autoencoder stage",
    )
    train.set_defaults(handler=_train)
