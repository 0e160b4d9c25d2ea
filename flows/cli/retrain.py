"""``ldm retrain``: the whole pipeline as one Prefect flow run; ``ldm schedule``: the
same flow served as a Prefect deployment on a cron schedule and on new datasets."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

from flows.cli.job_options import add_job_options, job_option_paths
from training.names import PresetName

# Options shared by retrain and schedule → where they go in RetrainConfig, for those
# given (with the training-job options shared with `ldm train`, flows.cli.job_options).
_FIELDS = {
    "source": ("source",),
    "dataset_url": ("dataset_url",),
    "image_size": ("shard", "image_size"),
    "channels": ("shard", "channels"),
    "val_fraction": ("shard", "val_fraction"),
    "shard_on_ray": ("shard", "engine"),
    "preset": ("train", "preset"),
    "warm_start": ("warm_start", "from_champion"),
    "reuse_autoencoder": ("warm_start", "reuse_autoencoder"),
    "ray_address": ("ray_address",),
    "port": ("serve", "port"),
    "serve_host": ("serve", "host"),
    "out": ("out_dir",),
} | job_option_paths()


def retrain_config_from_args(args: argparse.Namespace):  # -> flows.retrain_config.RetrainConfig
    """``--config FILE`` (JSON or YAML of RetrainConfig), or the embedded defaults, with
    the options given on the command line on top, then each ``--set PATH=VALUE``.
    ValueError/ValidationError if invalid."""
    from flows.cli.config_files import read_config_file
    from flows.retrain_config import DEFAULTS, RetrainConfig

    defaults = DEFAULTS.model_dump()
    values = read_config_file(Path(args.config)) if args.config else defaults
    overrides = {
        path: getattr(args, option)
        for option, path in _FIELDS.items()
        if getattr(args, option) is not None
    }
    if getattr(args, "no_serve", False):
        overrides[("serve", "enabled")] = False
    for assignment in getattr(args, "set", None) or []:
        path, value = parse_assignment(assignment)
        overrides[path] = value
    for path, value in overrides.items():
        _override(values, path, value, defaults)
    return RetrainConfig.model_validate(values)


def parse_assignment(text: str) -> tuple[tuple[str, ...], Any]:
    """``evaluation.samples_per_class=20`` → (("evaluation", "samples_per_class"), 20);
    the value is read as YAML (numbers, true/false, null, [lists], or text)."""
    import yaml

    path, sep, raw = text.partition("=")
    parts = tuple(path.strip().split("."))
    if not sep or not all(parts):
        raise ValueError(f"--set {text!r}: write PATH=VALUE, e.g. --set evaluation.steps=50")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _override(values: dict, path: tuple[str, ...], value: Any, defaults: dict) -> None:
    """Set ``values[path]``; a section the config leaves out starts as the default's."""
    *parents, leaf = path
    node, default = values, defaults
    for parent in parents:
        default = default.get(parent) if isinstance(default, dict) else None
        if not isinstance(node.get(parent), dict):
            if node.get(parent) is not None:
                raise ValueError(f"{'.'.join(path)}: {parent} is a value, not a section")
            node[parent] = copy.deepcopy(default) if isinstance(default, dict) else {}
        node = node[parent]
    node[leaf] = value
    if leaf == "cpus_per_worker":  # the torch threads follow the CPUs
        node.pop("torch_threads", None)


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """The Prefect API of this command: the configured one, else a server of its own
    (database in ``LDM_HOME/prefect``) in its own process session. Prefect's ephemeral
    server would share the terminal's process group: a Ctrl-C would stop it first, and
    the interrupted flow would then spend minutes failing to record that it crashed."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from flows.local_stack import spawn_prefect, stop_service
    from training.job import default_local_store

    server = spawn_prefect(
        default_local_store(), dict(os.environ), str(Path(sys.executable).parent)
    ).wait()
    try:
        with temporary_settings(updates={PREFECT_API_URL: f"{server.url}/api"}):
            try:
                yield
            finally:
                _send_pending_logs_and_events()
    finally:
        stop_service(server)


def _send_pending_logs_and_events(timeout_s: float = 10.0) -> None:
    """Hand Prefect's background log and event workers' queues to the server while it
    still runs: at exit they would wait for good on one that has stopped."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout_s)


def _stated_failures() -> tuple[type[Exception], ...]:
    """What a flow run raises to say what to fix: the command prints it as its error."""
    from data.storage import StorageError
    from training.optimisation import NonFiniteLoss

    return (ValueError, StorageError, NonFiniteLoss)


def _console_without_stated_tracebacks() -> None:
    """Prefect logs a failed task's and flow's exception with its traceback. On this
    command's console an error that says what to fix shows as its message alone (the
    command ends with it); the Prefect server's log keeps the traceback."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    stated = _stated_failures()

    def plain(record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], stated):
            record.exc_info, record.exc_text = None, None
        return True

    ensure_logging_setup()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(plain)


def _retrain(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.cli.config_files import config_error

    try:
        config = retrain_config_from_args(args)  # a ValidationError is a ValueError
    except ValueError as error:
        return config_error("ldm retrain", error)
    from flows.local_stack import unused_stack_note
    from flows.retrain import retrain
    from training.job import default_local_store
    from training.progress import quiet_libraries

    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if note := unused_stack_note(default_local_store(), address):
        print(note, file=sys.stderr)
    quiet_libraries(config.train.verbose)
    _console_without_stated_tracebacks()
    try:
        with prefect_api():
            report = retrain(config)
    except _stated_failures() as error:  # unusable data or settings, an outage outlasted
        print(f"ldm retrain: error: {error}", file=sys.stderr)
        return 1
    _print_summary(report)
    if args.keep_serving and report.endpoint:
        print(f"Serving at {report.endpoint.url} (Ctrl-C to stop).")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def _schedule(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.cli.config_files import config_error
    from flows.schedule import retrain_deployment, serve_deployments

    try:
        config = retrain_config_from_args(args)
        deployment = retrain_deployment(
            config,
            name=args.name,
            cron=args.cron,
            timezone=args.timezone,
            on_new_dataset=args.on_new_dataset,
        )
    except ValueError as error:
        return config_error("ldm schedule", error)
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "ldm schedule: PREFECT_API_URL is not set: the schedule lives in a temporary "
            "Prefect server for as long as this command runs",
            file=sys.stderr,
        )
    when = [f"cron '{args.cron}' ({args.timezone})"] if args.cron else []
    when += ["each new dataset manifest"] if args.on_new_dataset else []
    print(f"Serving deployment retrain/{args.name} on {' and '.join(when)} (Ctrl-C to stop).")
    serve_deployments(deployment)
    return 0


def _print_summary(report) -> None:  # flows.report.RetrainReport
    promotion, training = report.promotion, report.training
    grid = report.endpoint.grid if report.endpoint else None
    parent = f" (warm start from {training.parent_version})" if training.parent_version else ""
    print(f"\nsample grid: {grid}" if grid else "\n(no endpoint deployed)")
    print(
        f"model: {report.model_name} v{training.version}{parent}; "
        f"{'promoted to @champion' if promotion.promoted else 'kept'}: {promotion.reason}"
    )
    print("metrics:", json.dumps(report.metrics, indent=2))
    uri = report.tracking_uri
    if uri.startswith("sqlite:"):
        print(f"MLflow UI: mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000)")
    else:
        print(f"MLflow UI: {uri}")
    api = os.environ.get("PREFECT_API_URL")
    if api:
        print(f"Prefect UI: {api.removesuffix('/').removesuffix('/api')} (flow 'retrain')")
    else:
        from training.job import default_local_store

        home = default_local_store() / "prefect"
        then = "(then http://127.0.0.1:4200, flow 'retrain')"
        print(f"Prefect UI: PREFECT_HOME={home} prefect server start   {then}")


def add_retrain_options(parser: argparse.ArgumentParser) -> None:
    """The RetrainConfig options; each one given overrides --config and the defaults."""
    add = parser.add_argument
    add(
        "--config",
        metavar="FILE",
        help="RetrainConfig as a JSON or YAML file (options below override it)",
    )
    add("--source", help="'mnist', an image folder or an .npz, local or s3:// (default: mnist)")
    add("--dataset-url", help="where the shards go (default: LDM_HOME/data/NAME)")
    add("--image-size", type=int, help="image side (default: 32)")
    add("--channels", type=int, choices=(1, 3), help="1 grayscale or 3 RGB (default: 1)")
    add("--val-fraction", type=float, help="share of images held out for evaluation (0.1)")
    add(
        "--shard-on-ray",
        action="store_const",
        const="ray",
        help="write the shards as Ray tasks on the cluster at --ray-address (shard.engine: "
        "ray); the bytes are the same as without",
    )
    add("--preset", choices=get_args(PresetName), help="model preset (default: demo)")
    add_job_options(parser, with_defaults=False)
    add(
        "--ray-address",
        help="default: RAY_ADDRESS, else a local Ray; a dashboard URL (http://head:8265) "
        "submits training as a Ray Job and deploys through the Serve REST API",
    )
    add(
        "--warm-start",
        action="store_true",
        default=None,
        help="start training from the champion's weights (from scratch while there is none)",
    )
    add(
        "--reuse-autoencoder",
        action="store_true",
        default=None,
        help="with --warm-start: keep the champion's autoencoder, skipping its stage",
    )
    add("--no-serve", action="store_true", help="skip deploying and sampling")
    add("--port", type=int, help="HTTP port of the endpoint (default: 8000)")
    add(
        "--serve-host",
        help="HTTP bind address of the endpoint (default: 127.0.0.1, this machine only; see "
        "the README's 'Security and limits' before exposing it)",
    )
    add("--out", help="folder for the sample grid (default: LDM_HOME/retrain)")
    add(
        "--set",
        action="append",
        metavar="PATH=VALUE",
        help="any field of the config, e.g. --set evaluation.samples_per_class=20 or "
        "--set serve.app.max_rows_per_forward=64 (value read as YAML; repeatable; "
        "applied last). Fields: RetrainConfig in flows/retrain_config.py",
    )


def add_retrain_command(commands: argparse._SubParsersAction) -> None:
    retrain = commands.add_parser(
        "retrain",
        help="run the whole retraining flow (shard, train, evaluate, promote, serve)",
        description="One Prefect flow run: shard SOURCE (skipped when the dataset is up to "
        "date), train the preset on Ray, evaluate and promote the new version, deploy the "
        "Ray Serve endpoint that follows @champion, and request a grid of every class over "
        "HTTP. With no options it runs on embedded defaults: the built-in MNIST digits, "
        "LDM_HOME (default ./outputs), sqlite MLflow, a local Ray and a Prefect "
        "server of its own (started and stopped with the command).",
    )
    add_retrain_options(retrain)
    retrain.add_argument(
        "--keep-serving",
        action="store_true",
        help="leave the endpoint up after the flow (Ctrl-C stops it)",
    )
    retrain.set_defaults(handler=_retrain)

    schedule = commands.add_parser(
        "schedule",
        help="serve the retraining flow as a Prefect deployment on a cron schedule "
        "and/or on each new dataset",
        description="Register the deployment retrain/NAME with the Prefect server at "
        "PREFECT_API_URL and run its flow runs from this process until Ctrl-C: on the cron "
        "schedule, and with --on-new-dataset whenever 'ldm shard' publishes a dataset "
        "(event ldm.dataset.sharded), training on that dataset as it is. For a work pool "
        "instead of this process, see infra/prefect/prefect.yaml.",
    )
    schedule.add_argument("--cron", help="e.g. '0 3 * * 1' (Mondays 03:00)")
    schedule.add_argument("--timezone", default="UTC", help="of the cron schedule (default: UTC)")
    schedule.add_argument(
        "--on-new-dataset", action="store_true", help="also run on each new dataset manifest"
    )
    schedule.add_argument(
        "--name", default="scheduled", help="deployment name (default: scheduled)"
    )
    add_retrain_options(schedule)
    schedule.set_defaults(handler=_schedule)
