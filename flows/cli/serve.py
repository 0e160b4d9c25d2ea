"""``ldm serve``: deploy the sampling app on Ray Serve; ``ldm sample``: ask it for images."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import get_args

from flows.cli.sampling_options import add_eps_scaling_options
from serving.ingress import INGRESSES
from training.names import SamplerName

STOP_WAIT_S = 15  # at exit, the most to wait for the local Ray's processes to end


def app_config_from_args(args: argparse.Namespace):  # -> serving.config.AppConfig
    """The AppConfig for ``ldm serve`` options; pydantic.ValidationError if one is invalid."""
    from serving.config import AppConfig

    values = dict(
        model_uri=args.model_uri,
        tracking_uri=args.tracking_uri,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        autocast=args.autocast,
        max_rows_per_forward=args.max_rows_per_forward,
        engine=args.engine,
        deterministic=not args.fast_kernels,
        batch_invariant=True if args.cuda_graph else args.batch_invariant,
        cuda_graph=args.cuda_graph,
        max_images_per_request=args.max_images_per_request,
        max_steps=args.max_steps,
        max_evaluations_per_request=args.max_evaluations,
        max_queued_requests=args.max_queued_requests,
        request_timeout_s=args.request_timeout_s,
        reload_interval_s=args.reload_interval_s,
    )
    if args.decode_width is not None:
        values["decode_width"] = args.decode_width
    if args.autoscale:
        low, _, high = args.autoscale.partition(":")
        values["autoscaling_config"] = {"min_replicas": low, "max_replicas": high or low}
    else:
        values["num_replicas"] = args.replicas
    return AppConfig.model_validate(values)


def _serve(args: argparse.Namespace) -> int:
    from flows.cli.config_files import config_error

    try:
        config = app_config_from_args(args)
    except ValueError as error:  # a ValidationError is a ValueError
        return config_error("ldm serve", error, option_style=True)

    from ray import serve

    from serving.deploy import DeployError, run_app
    from training.ray.connection import RayUnavailable, connect_ray, resolve_address

    try:
        if args.ingress == "haproxy":
            _ask_for_haproxy(resolve_address(args.address))
        # A local Ray inherits this environment (credentials, LDM_API_TOKEN, the
        # ingress); a joined cluster's replicas use their nodes' own.
        connect_ray(args.address)
    except (RayUnavailable, ValueError, FileNotFoundError) as error:
        print(f"ldm serve: error: {error}", file=sys.stderr)
        return 1
    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        run_app(config, args.name, timeout_s=args.start_timeout_s, delete_on_failure=True)
    except DeployError as error:
        print(f"ldm serve: error: {error}", file=sys.stderr)
        return 1
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    _warn_if_token_missing(url)
    print(
        f"Serving {config.model_uri} at http://{args.host}:{args.port}/ (Ctrl-C to stop)",
        flush=True,
    )
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        if args.ingress == "haproxy":  # Serve keeps a replica 30 s for HAProxy to drop it
            print("stopping: HAProxy drains the replicas (about 30 s)", flush=True)
        serve.delete(args.name)
        print(f"stopped application '{args.name}'", flush=True)
    return 0


def _ask_for_haproxy(cluster: str | None) -> None:
    """Set this process's environment so that the local Ray about to start runs HAProxy
    as Serve's ingress, its files in a folder removed at exit. ValueError for a cluster
    to join, whose ingress its nodes' environment set when they started."""
    import atexit
    import tempfile

    from flows.local_stack import free_ports
    from serving.ingress import ENABLE_ENV, PORT_ENVS, haproxy_binary, haproxy_env

    if cluster is not None:
        raise ValueError(
            f"--ingress haproxy starts HAProxy with a local Ray; the cluster at {cluster} "
            f"has the ingress its nodes started with (set {ENABLE_ENV}=1 in every node's "
            "environment before 'ray start'), or pass --address local"
        )
    haproxy_binary()  # FileNotFoundError: say so now, not as a controller that never starts
    folder = Path(tempfile.mkdtemp(prefix="ldm-haproxy-"))
    atexit.register(_remove_when_ray_is_gone, folder)
    os.environ.update(haproxy_env(folder, free_ports(len(PORT_ENVS))))


def _remove_when_ray_is_gone(folder: Path) -> None:
    """Stop the local Ray, then remove HAProxy's ``folder`` once Ray's processes (this
    process's descendants) have exited: Serve's HAProxy manager may still be rewriting
    its files there, e.g. for an app deleted by a Ctrl-C during its deployment."""
    import shutil

    import psutil
    import ray

    ray.shutdown()  # Ray's own exit handler runs after this one; then it has nothing to do
    psutil.wait_procs(psutil.Process().children(recursive=True), timeout=STOP_WAIT_S)
    shutil.rmtree(folder, ignore_errors=True)


def _warn_if_token_missing(url: str) -> None:
    """With LDM_API_TOKEN set here, the replicas must refuse a request without it; on a
    joined cluster they only see the token if its nodes have it."""
    import urllib.error
    import urllib.request

    from serving.admission import TOKEN_ENV

    if not os.environ.get(TOKEN_ENV):
        return
    try:
        with urllib.request.urlopen(f"{url}/v1/model", timeout=10):
            required = False
    except urllib.error.HTTPError as error:
        required = error.code == 401
    except OSError:
        return  # not reachable from here; nothing to tell
    if not required:
        print(
            f"ldm serve: warning: {TOKEN_ENV} is set here but the replicas do not require "
            "it: set it in the environment of the cluster's nodes (e.g. from a Kubernetes "
            "Secret)",
            file=sys.stderr,
        )


def _sample(args: argparse.Namespace) -> int:
    from serving.client import SampleError, parse_label, request_samples

    payload: dict = {
        "guidance_scale": args.guidance_scale,
        "classifier_scale": args.classifier_scale,
        "sampler": args.sampler,
        "eta": args.eta,
        "format": args.format,
    }
    if args.eps_scaling is not None:  # else the version's searched default
        payload["eps_scaling"] = args.eps_scaling
    if args.eps_scaling_slope != 0.0:
        payload["eps_scaling_slope"] = args.eps_scaling_slope
    if args.labels:
        payload["labels"] = [parse_label(x) for x in args.labels.split(",")]
    else:
        payload |= {"label": parse_label(args.label), "num_samples": args.num_samples}
    for key in ("steps", "seed"):
        if getattr(args, key) is not None:
            payload[key] = getattr(args, key)
    try:
        reply = request_samples(args.url, payload, timeout=args.timeout)
    except SampleError as error:
        print(f"ldm sample: error: {error}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(reply.body)
    print(f"{reply.summary}; wrote {out}")
    return 0


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="deploy the Ray Serve sampling app for a registered model",
        description="Deploy the sampling app (POST /v1/samples, GET /v1/model, GET /healthz "
        "and a page at /) on the Ray cluster at --address or RAY_ADDRESS, or on a local Ray. "
        "Replicas load the model version the alias points at and switch when the alias "
        "moves. Blocks until Ctrl-C, which deletes the app.",
    )
    serve.add_argument(
        "--model-uri",
        default="models:/ldm@champion",
        help="models:/NAME@ALIAS (followed on reload) or models:/NAME/VERSION "
        "(default: models:/ldm@champion)",
    )
    serve.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite)"
    )
    serve.add_argument(
        "--address",
        help="Ray cluster to deploy on: ray://HOST:PORT or HOST:PORT, 'auto' for the one "
        "running here, 'local' to start a new local Ray (default: RAY_ADDRESS, else the "
        "running local Ray, else a new one)",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="HTTP bind address (default: 127.0.0.1, this machine only; see the README's "
        "'Security and limits' before exposing it)",
    )
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    serve.add_argument(
        "--ingress",
        choices=INGRESSES,
        default="proxy",
        help="what takes HTTP on --port: Serve's Python proxy, or HAProxy forwarding "
        "straight to each replica (more images/s on a CPU). haproxy needs a local Ray "
        "(a cluster has it when its nodes start with RAY_SERVE_ENABLE_HA_PROXY=1) "
        "(default: proxy)",
    )
    serve.add_argument("--name", default="ldm", help="Serve application name (default: ldm)")
    serve.add_argument(
        "--start-timeout-s",
        type=float,
        default=600.0,
        help="give up (and delete the app) when it is not running by then, e.g. when no "
        "node can hold a replica and the cluster adds none (default: 600)",
    )
    scaling = serve.add_mutually_exclusive_group()
    scaling.add_argument("--replicas", type=int, default=1, help="fixed replicas (default: 1)")
    scaling.add_argument(
        "--autoscale", metavar="MIN:MAX", help="autoscale between MIN and MAX replicas"
    )
    serve.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    serve.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (default 0)")
    serve.add_argument(
        "--autocast",
        choices=("auto", "off", "bf16", "fp16"),
        default="auto",
        help="the networks' precision: auto (default) is bf16 on a CPU that computes it "
        "natively and float32 elsewhere; off is float32",
    )
    serve.add_argument(
        "--max-rows-per-forward",
        type=int,
        help="images per denoising step across requests, an image with classifier-free "
        "guidance counting twice (default: 64 on CPU, 256 on GPU)",
    )
    serve.add_argument(
        "--decode-width",
        type=int,
        help="images per decoder call; with batch invariance the requests that finish at "
        "one step share these calls (default: 32)",
    )
    serve.add_argument(
        "--engine",
        choices=("process", "thread"),
        default="process",
        help="where each replica's sampling loop runs: a child process with its own "
        "interpreter, or a thread of the replica (default: process)",
    )
    serve.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run every denoising step at the full --max-rows-per-forward width (padded), "
        "so an image is bit-identical whatever it is batched with (default: on with "
        "--num-gpus, off on the CPU)",
    )
    serve.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on a GPU replica: replay each denoising step as a CUDA graph recorded at "
        "the full width (implies --batch-invariant; default: on with --num-gpus unless "
        "--no-batch-invariant)",
    )
    serve.add_argument(
        "--fast-kernels",
        action="store_true",
        help="on a GPU, allow TF32 and cuDNN's non-deterministic algorithms (faster; the "
        "same request may then differ by a pixel level between runs)",
    )
    serve.add_argument(
        "--max-images-per-request", type=int, default=64, help="request limit (default: 64)"
    )
    serve.add_argument("--max-steps", type=int, default=1000, help="request limit (default 1000)")
    serve.add_argument(
        "--max-evaluations",
        type=int,
        default=16_384,
        help="work budget per request in network evaluations: images × steps × passes "
        "(classifier-free guidance doubles, classifier guidance adds 2) (default: 16384)",
    )
    serve.add_argument(
        "--max-queued-requests",
        type=int,
        default=64,
        help="requests waiting for a replica; beyond it 503 with Retry-After (default: 64)",
    )
    serve.add_argument(
        "--request-timeout-s",
        type=float,
        default=120.0,
        help="a request not answered by then gets a 504 (default: 120)",
    )
    serve.add_argument(
        "--reload-interval-s",
        type=float,
        default=30.0,
        help="seconds between alias checks, 0: never reload (default: 30)",
    )
    serve.set_defaults(handler=_serve)


def _add_sample(commands: argparse._SubParsersAction) -> None:
    sample = commands.add_parser(
        "sample",
        help="request images from a running sampling app",
        description="POST a request to URL/v1/samples and write the answer (a PNG grid by "
        "default) to --out. A label that is a number is a class id; anything else "
        "is a class name.",
    )
    sample.add_argument(
        "--url", default="http://127.0.0.1:8000", help="app URL (default: http://127.0.0.1:8000)"
    )
    which = sample.add_mutually_exclusive_group(required=True)
    which.add_argument("--label", help="one class id or name for every image")
    which.add_argument("--labels", help="comma-separated class ids or names, one per image")
    sample.add_argument("--num-samples", type=int, default=8, help="images with --label (8)")
    sample.add_argument("--guidance-scale", type=float, default=0.0, help="classifier-free w>=0")
    sample.add_argument("--classifier-scale", type=float, default=0.0, help="classifier s>=0")
    sample.add_argument("--sampler", choices=get_args(SamplerName), default="ddim")
    sample.add_argument("--steps", type=int, help="sampling steps (default: the app's)")
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1] (default 0)")
    sample.add_argument("--seed", type=int, help="seed; image i uses seed+i (default: random)")
    add_eps_scaling_options(sample, default_b=None)
    sample.add_argument("--format", choices=("png", "json", "npy"), default="png")
    sample.add_argument("-o", "--out", default="samples.png", help="output file")
    sample.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (300)")
    sample.set_defaults(handler=_sample)


def add_serve_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``ldm serve`` and ``ldm sample``."""
    _add_serve(commands)
    _add_sample(commands)
