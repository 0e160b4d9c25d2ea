"""``ldm evaluate``, ``ldm promote`` and ``ldm rollback``: measuring registered models
and moving the ``@champion`` alias."""

from __future__ import annotations

import argparse
import json
import sys
from typing import get_args

from flows.cli.sampling_options import add_eps_scaling_options
from training.names import PromotionMetric, SamplerName


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the sqlite "
        "file under LDM_HOME or ./outputs)",
    )


def _evaluation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        metavar="MANIFEST_URL",
        help="dataset to compare with (default: the one the model trained on)",
    )
    parser.add_argument(
        "--samples-per-class",
        type=int,
        default=20,
        help="class-conditional samples per class (default: 20)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=2.0,
        help="classifier-free guidance w >= 0 (default: 2)",
    )
    parser.add_argument(
        "--sampler", choices=get_args(SamplerName), default="ddim", help="sampler (default: ddim)"
    )
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    add_eps_scaling_options(parser)
    parser.add_argument(
        "--evaluator-cache",
        metavar="URL",
        help="folder or s3:// prefix caching one evaluator per dataset "
        "(default: LDM_HOME/evaluators)",
    )


def _settings(args: argparse.Namespace):
    from training.evaluation.scoring import EvaluationSettings

    return EvaluationSettings(
        samples_per_class=args.samples_per_class,
        guidance_scale=args.guidance_scale,
        sampler=args.sampler,
        steps=args.steps,
        seed=args.seed,
        eps_scaling=args.eps_scaling,
        eps_scaling_slope=args.eps_scaling_slope,
    )


def _locations(args: argparse.Namespace) -> tuple[str, str]:
    from training.job import default_local_store
    from training.mlflow.tracking import resolve_tracking_uri

    store = default_local_store()
    cache = getattr(args, "evaluator_cache", None) or str(store / "evaluators")
    return resolve_tracking_uri(store, args.tracking_uri), cache


def _evaluate(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from training.evaluation.eps_search import (
        EPS_SCALING_TAG,
        parse_cells,
        search_eps_scaling,
        store_eps_scaling,
    )
    from training.evaluation.evaluator import get_evaluator
    from training.evaluation.promotion import _training_data, require_val_split
    from training.evaluation.scoring import evaluate_model, log_evaluation
    from training.mlflow.registry import load_model_version, resolve_model_version

    tracking_uri, cache = _locations(args)
    try:
        name, version = resolve_model_version(args.model_uri, tracking_uri)
        data_url = args.data or _training_data(MlflowClient(tracking_uri), name, version)
        require_val_split(data_url)
        evaluator = get_evaluator(data_url, cache)
        settings = _settings(args)
        model = load_model_version(f"models:/{name}/{version}", tracking_uri)
        report = evaluate_model(
            model, data_url, evaluator, settings, progress=f"evaluating {name} v{version}"
        )
        log_evaluation(report, settings, tracking_uri, name, version)
        search = None
        if args.search_eps_scaling:
            search = search_eps_scaling(
                model,
                data_url,
                evaluator,
                settings,
                parse_cells(args.eps_cells),
                tuple(float(b) for b in args.eps_scales.split(",")),
                progress=True,
            )
            store_eps_scaling(tracking_uri, name, version, search.defaults)
    except Exception as error:
        print(f"ldm evaluate: error: {error}", file=sys.stderr)
        return 1
    print(f"{name} v{version} on {data_url}:")
    print(json.dumps(report.metrics, indent=2))
    if search is not None:
        print(f"epsilon scaling kept with v{version} (tag {EPS_SCALING_TAG}), best FD per cell:")
        print("\n".join(f"  {line}" for line in search.summary()))
    return 0


def _promote(args: argparse.Namespace) -> int:
    from training.evaluation.promotion import promote

    tracking_uri, cache = _locations(args)
    try:
        result = promote(
            args.name,
            tracking_uri,
            cache,
            version=args.version,
            metric=args.metric,
            min_improvement=args.min_improvement,
            force=args.force,
            data_url=args.data,
            settings=_settings(args),
            progress=True,
        )
    except Exception as error:
        print(f"ldm promote: error: {error}", file=sys.stderr)
        return 1
    verdict = "promoted to @champion" if result.promoted else "not promoted"
    print(f"{args.name} v{result.candidate} {verdict}: {result.reason}")
    return 3 if result.lost_race else 0


def _rollback(args: argparse.Namespace) -> int:
    from training.evaluation.promotion import rollback

    tracking_uri, _ = _locations(args)
    try:
        before, after = rollback(args.name, tracking_uri)
    except Exception as error:
        print(f"ldm rollback: error: {error}", file=sys.stderr)
        return 1
    print(f"{args.name}: @champion moved back from v{before} to v{after}")
    return 0


def add_registry_commands(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="measure a registered model (class consistency, Fréchet distance)",
        description="Sample every class with a fixed seed and measure: class consistency "
        "(accuracy of an evaluator classifier trained on the dataset), per-class accuracy, "
        "Fréchet distance in the evaluator's feature space against held-out images, "
        "autoencoder PSNR on the val split, seconds per image. Logs them to the model's "
        "MLflow run and as tags on the model version.",
    )
    evaluate.add_argument(
        "model_uri", metavar="MODEL_URI", help="models:/NAME/VERSION or models:/NAME@ALIAS"
    )
    _evaluation_options(evaluate)
    evaluate.add_argument(
        "--search-eps-scaling",
        action="store_true",
        help="also measure epsilon scaling b over --eps-scales at each of --eps-cells and "
        "keep the best b per cell (lowest FD) with the version: the endpoint then uses "
        "it for requests that do not set eps_scaling",
    )
    evaluate.add_argument(
        "--eps-cells",
        default="ddim10,ddim20,dpmpp_2m20",
        metavar="SAMPLER+STEPS,…",
        help="where to search (default: ddim10,ddim20,dpmpp_2m20)",
    )
    evaluate.add_argument(
        "--eps-scales",
        default="0.96,0.97,0.98,0.99,1,1.01",
        metavar="B,…",
        help="the values of b tried; 1 is always among them (default: 0.96,…,1.01)",
    )
    _common(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    promote = commands.add_parser(
        "promote",
        help="move the registry alias @champion to a better candidate",
        description="Evaluate the candidate (--version, default @candidate) and the current "
        "@champion with the same evaluator, data and seed; move @champion to the candidate "
        "only when it is better by more than --min-improvement (or there is no champion, or "
        "--force). The former champion stays under @previous; the decision and its reason "
        "are written as tags on both versions. Exit status 0 when promoted or not better, "
        "3 when another promotion won a race.",
    )
    promote.add_argument("name", metavar="NAME", help="registered model name")
    promote.add_argument("--version", help="version to promote (default: @candidate)")
    promote.add_argument(
        "--metric",
        choices=get_args(PromotionMetric),
        default="fd",
        help="what decides: lower fd or higher class_consistency (default: fd)",
    )
    promote.add_argument(
        "--min-improvement",
        type=float,
        default=0.0,
        help="required margin over the champion (default: 0, strictly better)",
    )
    promote.add_argument("--force", action="store_true", help="promote without comparing")
    _evaluation_options(promote)
    _common(promote)
    promote.set_defaults(handler=_promote)

    rollback = commands.add_parser(
        "rollback",
        help="move @champion back to the previous version",
        description="Point @champion at the version under @previous and remove @previous.",
    )
    rollback.add_argument("name", metavar="NAME", help="registered model name")
    _common(rollback)
    rollback.set_defaults(handler=_rollback)
