"""``ldm retrain``: the whole pipeline as one Prefect flow run."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _retrain(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from pydantic import ValidationError

    from data.manifest import ShardOptions
    from flows.retrain import RetrainConfig, retrain

    try:
        config = RetrainConfig(
            source=args.source,
            dataset_url=args.dataset_url,
            shard=ShardOptions(image_size=args.image_size, channels=args.channels),
            preset=args.preset,
            workers=args.workers,
            cpus_per_worker=args.cpus_per_worker,
            storage_url=args.storage,
            run_name=args.run_name,
            model_name=args.model_name,
            tracking_uri=args.tracking_uri,
            serve=not args.no_serve,
            port=args.port,
            out_dir=args.out,
        )
        report = retrain(config)
    except (ValidationError, ValueError) as error:
        print(f"ldm retrain: error: {error}", file=sys.stderr)
        return 1
    _print_summary(report)
    if args.keep_serving and report["endpoint"]:
        print(f"Serving at {report['endpoint']} (Ctrl-C to stop).")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def _print_summary(report: dict) -> None:
    promotion, training = report["promotion"], report["training"]
    version = training["version"]
    print(f"\nsample grid: {report['grid']}" if report["grid"] else "\n(no endpoint deployed)")
    print(
        f"model: {report['model_name']} v{version}; "
        f"{'promoted to @champion' if promotion['promoted'] else 'kept'}: {promotion['reason']}"
    )
    print("metrics:", json.dumps(promotion["metrics"].get(version, {}), indent=2))
    uri = report["tracking_uri"]
    if uri.startswith("sqlite:"):
        print(f"MLflow UI: mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000)")
    else:
        print(f"MLflow UI: {uri}")
    print("Prefect UI: prefect server start   (then http://127.0.0.1:4200, flow 'retrain')")


def add_retrain_command(commands: argparse._SubParsersAction) -> None:
    retrain = commands.add_parser(
        "retrain",
        help="run the whole retraining flow (shard, train, evaluate, promote, serve)",
        description="One Prefect flow run: shard SOURCE (skipped when the dataset is up to "
        "date), train the preset on Ray, evaluate and promote the new version, deploy the "
        "Ray Serve endpoint that follows @champion, and request a grid of every class over "
        "HTTP. With no options it runs on embedded defaults: the built-in MNIST digits, "
        "LDM_HOME (default ./outputs), sqlite MLflow, a local Ray and Prefect's ephemeral "
        "server.",
    )
    retrain.add_argument(
        "--source",
        default="mnist",
        help="'mnist', an image folder or an .npz, local or s3:// (default: mnist)",
    )
    retrain.add_argument("--dataset-url", help="where the shards go (default: LDM_HOME/data/NAME)")
    retrain.add_argument("--image-size", type=int, default=32, help="image side (default: 32)")
    retrain.add_argument(
        "--channels", type=int, choices=(1, 3), default=1, help="1 grayscale or 3 RGB (default: 1)"
    )
    retrain.add_argument(
        "--preset",
        choices=("tiny", "demo", "base"),
        default="demo",
        help="model preset (default: demo)",
    )
    retrain.add_argument("--workers", type=int, default=1, help="Ray Train workers (default: 1)")
    retrain.add_argument(
        "--cpus-per-worker",
        type=float,
        default=2.0,
        help="CPUs (and torch threads) per worker (default: 2)",
    )
    retrain.add_argument("--storage", help="checkpoints folder or s3:// (default: LDM_HOME/runs)")
    retrain.add_argument("--run-name", help="training run name; the same name resumes")
    retrain.add_argument("--model-name", default="ldm", help="registered model (default: ldm)")
    retrain.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite)")
    retrain.add_argument("--no-serve", action="store_true", help="skip deploying and sampling")
    retrain.add_argument(
        "--keep-serving",
        action="store_true",
        help="leave the endpoint up after the flow (Ctrl-C stops it)",
    )
    retrain.add_argument("--port", type=int, default=8000, help="HTTP port of the endpoint")
    retrain.add_argument("--out", help="folder for the sample grid (default: LDM_HOME/retrain)")
    retrain.set_defaults(handler=_retrain)
