"""Throughput and peak memory of every method at batch 512 with resnet18 on Fashion-MNIST, and the
seed notebook's loop, in one call; writes throughput.md and throughput.json to a folder.

    python scripts/gpu_throughput.py OUT_DIR [--device cuda] [--batch-size 512] [--steps 20]

Made for an H100/H200 lease (a few minutes); runs on the CPU too with small --steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from harness.data import load_dataset
from harness.provenance import device_name
from harness.seed_loop import seed_loop_images_per_s
from harness.spec import METHOD_NAMES, resolve
from harness.train import run_trial


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method (after 3 warm-up steps)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--methods", default=",".join(m for m in METHOD_NAMES if m != "random_init"))
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    n_images = args.batch_size * (args.steps + 3)
    rows = []
    for method in args.methods.split(","):
        overrides = {"method": method, "backbone": args.backbone, "dataset": "fashion-mnist",
                     "train_size": n_images, "test_size": 1000, "batch_size": args.batch_size, "epochs": 1,
                     "eval_every": 0, "linear_epochs": 1, "device": args.device}
        if method == "moco":
            overrides["queue_size"] = 16 * args.batch_size
        config = resolve(overrides)
        record = run_trial(config, progress=False)
        rows.append({"method": method, "status": record.status, "reason": record.reason,
                     "img_per_s": record.summary["train_img_per_s"],
                     "peak_mem_bytes": record.summary["peak_mem_bytes"]})
        print(rows[-1], flush=True)
    images = load_dataset("fashion-mnist", "train", size=n_images).images
    seed = seed_loop_images_per_s(images, backbone=args.backbone, batch_size=args.batch_size, steps=args.steps,
                                  device=args.device)
    rows.append({"method": "seed loop (PIL, 2 workers, reference NT-Xent)", "status": "complete", "reason": None,
                 "img_per_s": seed["img_per_s"], "peak_mem_bytes": seed["peak_mem_bytes"]})
    card = device_name(args.device)
    lines = [f"Device: {card}; torch {torch.__version__}; {args.backbone}, batch {args.batch_size}, "
             f"{args.steps} timed steps", "", "| method | img/s | x seed loop | peak memory (MiB) | status |",
             "|---|---:|---:|---:|---|"]
    for row in rows:
        rate = row["img_per_s"] or 0.0
        mem = (row["peak_mem_bytes"] or 0.0) / 2**20
        lines.append(f"| {row['method']} | {rate:.0f} | {rate / seed['img_per_s']:.1f} | {mem:.0f} | "
                     f"{row['status']}{' (' + row['reason'] + ')' if row['reason'] else ''} |")
    (args.out_dir / "throughput.md").write_text("\n".join(lines) + "\n")
    (args.out_dir / "throughput.json").write_text(json.dumps({"device": card, "rows": rows}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
