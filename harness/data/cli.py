"""``harness data``: prepare and inspect the shards of image-folder datasets.

    harness data prepare imagefolder --root /data/pets --image-size 64 [--split train] [--workers 8]
    harness data prepare imagenet100 --root /data/imagenet --image-size 224
    harness data info imagefolder --root /data/pets --image-size 64

``prepare`` writes the shards where trials look for them (``$HARNESS_CACHE_DIR/datasets/shards``,
default ``~/.cache/harness/datasets/shards``), so a study run afterwards starts training at once.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from harness.data.datasets import (
    DEFAULT_IMAGE_SIZE,
    FOLDER_DATASETS,
    FOLDER_SPLITS,
    DatasetNotFoundError,
    shard_for,
)
from harness.data.formats import DataFormatError
from harness.data.shards import BAD_IMAGE_POLICIES, ShardError, prepare_shard, read_meta

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_text in (
        ("prepare", "decode an image folder once into memory-mappable shards (parallel, resumable)"),
        ("info", "show whether the shards of a dataset are prepared and up to date"),
    ):
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("dataset", choices=FOLDER_DATASETS, help="the dataset (its name in study files)")
        sub.add_argument("--root", required=True, help="the dataset folder (data_root): ROOT/train/CLASS/*.jpg ...")
        sub.add_argument(
            "--split", choices=(*FOLDER_SPLITS, "all"), default="all",
            help="which split (default: all: every split folder present)",
        )
        sub.add_argument(
            "--image-size", type=int, default=DEFAULT_IMAGE_SIZE, metavar="R",
            help=f"side of the stored images: shorter side resized, centre crop (default {DEFAULT_IMAGE_SIZE})",
        )
        if name == "prepare":
            sub.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPUs, at most 8)")
            sub.add_argument(
                "--on-bad-image", choices=BAD_IMAGE_POLICIES, default="skip",
                help="skip unreadable images (listed in the shard's meta.json) or stop at the first",
            )
            sub.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    splits = list(FOLDER_SPLITS) if args.split == "all" else [args.split]
    done = 0
    for split in splits:
        try:
            source, shard, classes, resolution = shard_for(args.dataset, split, args.root, args.image_size)
        except DatasetNotFoundError as error:
            if args.split == "all" and split != "train":
                continue  # an absent optional split (val/test, unlabeled)
            print(f"harness data {args.action}: {error}", file=sys.stderr)
            return 2
        try:
            if args.action == "info":
                meta = read_meta(shard)
                if meta is None:
                    state = "not prepared"
                else:
                    from harness.data.formats import list_image_folder
                    from harness.data.shards import folder_fingerprint

                    fresh = folder_fingerprint(list_image_folder(source, classes=classes)) == meta.fingerprint
                    state = f"{meta.describe()}; {'up to date' if fresh else 'STALE (the source changed)'}"
                print(f"{split}: {source} -> {shard}: {state}")
            else:
                before = read_meta(shard)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    meta = prepare_shard(
                        source, shard, resolution=resolution, classes=classes, workers=args.workers,
                        on_bad_image=args.on_bad_image, progress=False if args.quiet else None,
                    )
                for warning in caught:
                    print(f"warning: {warning.message}", file=sys.stderr)
                verb = "up to date" if before == meta else "prepared"
                print(f"{split}: {verb}: {shard}: {meta.describe()}")
        except (FileNotFoundError, DataFormatError, ShardError, ValueError) as error:
            print(f"harness data {args.action}: {error}", file=sys.stderr)
            return 2
        done += 1
    return 0 if done else 2
