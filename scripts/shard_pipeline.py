"""Two-view images per second from a prepared shard at a given resolution, eager and compiled
augmentation, on a device; prints the figures and writes them to OUT_DIR/shard_pipeline.json.

    python scripts/shard_pipeline.py OUT_DIR [--device cuda] [--image-size 224] [--images 2048]

Issue 14's GPU goal (>= 20,000 img/s at 224 px, two views, on an H100) is measured with this on a
lent GPU (scripts/gpu_lease.sh); on the CPU it runs with small sizes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from harness.data.pipeline_bench import shard_pipeline_rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled augmentation")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as root:
        figures = shard_pipeline_rates(
            root, image_size=args.image_size, n_images=args.images, batch_size=args.batch_size,
            device=args.device, epochs=args.epochs, compiled=not args.eager_only,
            report=lambda line: print(line, flush=True),
        )
    for key, value in figures.items():
        print(f"{key:28s} {value}")
    (args.out_dir / "shard_pipeline.json").write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
