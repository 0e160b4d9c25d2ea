"""``ldm up`` / ``ldm down``: the local production-like stack (see flows/local_stack.py)."""

from __future__ import annotations

import argparse
import sys

from training.names import STACK_NODE_CPUS


def _up(args: argparse.Namespace) -> int:
    from flows.local_stack import ENV_FILE, StackError, up
    from training.job import default_local_store

    home = default_local_store()
    print(f"Starting the local stack in {home / 'stack'} …", flush=True)
    try:
        stack = up(
            home,
            with_prefect=args.with_prefect,
            head_cpus=args.head_cpus,
            worker_cpus=args.worker_cpus,
            log=lambda line: print("  " + line, flush=True),
        )
    except (StackError, ValueError, OSError) as error:
        print(f"ldm up: error: {error}", file=sys.stderr)
        return 1
    env_file = f"{stack.folder}/{ENV_FILE}"
    print("\nUse it from this shell (the file also holds the generated S3 key, mode 600):")
    print(f"  source {env_file}")
    print("which sets:")
    for key, value in sorted(stack.env.items()):
        print(f"  export {key}={value}")
    print("  export AWS_ACCESS_KEY_ID=… AWS_SECRET_ACCESS_KEY=…   (from the file)")
    print("then 'ldm retrain' trains through Ray Jobs and serves through the Serve REST API;")
    print("'ldm down' stops everything.")
    return 0


def _down(args: argparse.Namespace) -> int:
    from flows.local_stack import down
    from training.job import default_local_store

    stopped = down(default_local_store())
    print(f"stopped: {', '.join(stopped)}" if stopped else "no local stack is running")
    return 0


def add_stack_commands(commands: argparse._SubParsersAction) -> None:
    up = commands.add_parser(
        "up",
        help="start a local stack: S3 server, MLflow server, Ray head + worker (and Prefect)",
        description="Start SeaweedFS (weed mini), mlflow server (sqlite store, artifacts in "
        "S3), a Ray head and one Ray worker node, and with --with-prefect a Prefect server, "
        "all on 127.0.0.1 with free ports and their state under LDM_HOME/stack. Prints the "
        "environment to export so that 'ldm retrain' uses them.",
    )
    up.add_argument("--with-prefect", action="store_true", help="also run 'prefect server start'")
    up.add_argument(
        "--head-cpus",
        type=int,
        default=STACK_NODE_CPUS,
        help=f"CPUs of the Ray head (default: {STACK_NODE_CPUS}, a training worker's default)",
    )
    up.add_argument(
        "--worker-cpus",
        type=int,
        default=STACK_NODE_CPUS,
        help=f"CPUs of the Ray worker node (default: {STACK_NODE_CPUS})",
    )
    up.set_defaults(handler=_up)
    down = commands.add_parser("down", help="stop the local stack started by 'ldm up'")
    down.set_defaults(handler=_down)
