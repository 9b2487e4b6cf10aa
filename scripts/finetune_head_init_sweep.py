"""Fine-tuning at 1% of Fashion-MNIST's labels from a saved encoder, one line per setting
``head_init:lr:backbone_lr_scale`` (docs/REPORTS.md, "Fine-tuning's head"): the same labeled
images, test subset and seed as ``harness evaluate`` on quickstart-evaluate (5 epochs of batch 64;
the probe of the LP-FT head trains ``--probe-epochs`` epochs, the study's ``linear_epochs``).

    python scripts/finetune_head_init_sweep.py --db COPY.db --trial 1 probe:0.01:0.1 zero:0.4:0.1
"""

from __future__ import annotations

import argparse
import time

from harness import protocols, results
from harness.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--trial", type=int, required=True)
    parser.add_argument("--from-scratch", action="store_true", help="random_init: every layer at the full rate")
    parser.add_argument("--probe-epochs", type=int, default=20)
    parser.add_argument("settings", nargs="+", help="head_init:lr:backbone_lr_scale")
    args = parser.parse_args()
    train = load_dataset("fashion-mnist", "train", device="cpu")
    test = load_dataset("fashion-mnist", "test", size=1000, seed=protocols.SUBSET_SEED, device="cpu")
    index = protocols.label_fraction_indices(train.labels, 0.01, seed=0)
    encoder = results.load_encoder(args.db, args.trial)
    for setting in args.settings:
        head_init, lr, scale = setting.split(":")
        start = time.perf_counter()
        tuned = protocols.fine_tune(
            encoder, train.images[index], train.labels[index], test.images, test.labels,
            num_classes=train.num_classes, mean=train.mean, std=train.std, epochs=5, lr=float(lr),
            backbone_lr_scale=1.0 if args.from_scratch else float(scale), batch_size=64,
            head_init=head_init, probe_epochs=args.probe_epochs, seed=0,
        )
        print(f"trial {args.trial} {setting}: top-1 {100 * tuned.top1:.1f}% ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
