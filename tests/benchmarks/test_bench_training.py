"""Training throughput: the harness's SimCLR step against the seed notebook's loop, same run.

Goal (issue 4): >= 1.8x on a 2-core CPU at batch 256 with small_cnn. Run with
``.venv/bin/python -m pytest tests/benchmarks/test_bench_training.py -s``. The two loops alternate
for ``ROUNDS`` rounds, so a burst of load from elsewhere hits both, and the median of each is
compared.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest

from harness.data import load_dataset
from harness.seed_loop import seed_loop_images_per_s
from harness.spec import resolve
from harness.train import run_trial

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
BATCH = 256
STEPS = 12
# Two rounds in the suite (CI time); HARNESS_BENCH_FULL=1 for the three behind the documented figures.
ROUNDS = 3 if os.environ.get("HARNESS_BENCH_FULL", "") not in {"", "0"} else 2


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_training_throughput__harness_vs_seed_loop(benchmark: pytest.FixtureRequest) -> None:
    n_images = BATCH * (STEPS + 3)
    images = load_dataset("fashion-mnist", "train", size=n_images).images
    config = resolve(
        {
            "method": "simclr",
            "dataset": "fashion-mnist",
            "train_size": n_images,
            "test_size": 200,
            "batch_size": BATCH,
            "epochs": 1,
            "eval_every": 0,
            "linear_epochs": 1,
            "knn_k": 20,
            "device": "cpu",
        }
    )

    def alternate() -> tuple[list[float], list[float]]:
        ours, seed = [], []
        for _ in range(ROUNDS):
            seed.append(seed_loop_images_per_s(images, batch_size=BATCH, steps=STEPS)["img_per_s"])
            record = run_trial(config, progress=False)
            assert record.status == "complete", record.reason
            ours.append(record.summary["train_img_per_s"])
        return ours, seed

    ours, seed = benchmark.pedantic(alternate, rounds=1, iterations=1)
    ours_median, seed_median = statistics.median(ours), statistics.median(seed)
    ratio = ours_median / seed_median
    benchmark.extra_info.update(harness_img_per_s=ours, seed_img_per_s=seed, ratio=ratio)
    rounds = ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(ours, seed, strict=True))
    print(
        f"\ntraining throughput, simclr/small_cnn batch {BATCH}: harness {ours_median:.0f} img/s, "
        f"seed loop {seed_median:.0f} img/s (medians of {ROUNDS}; rounds {rounds}), ratio {ratio:.2f}x"
    )
    assert min(ours) > 0 and min(seed) > 0
