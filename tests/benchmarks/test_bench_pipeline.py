"""Two-view generation: our batched pipeline against the seed notebook's PIL + DataLoader pipeline.

Both run in the same session on the same 4096 Fashion-MNIST training images, batch 256, and
produce normalized float batches of two views. Goal: >= 20x on a 2-core CPU. Run with
``.venv/bin/python -m pytest tests/benchmarks/test_bench_pipeline.py --benchmark-only``; the
figures are recorded in docs/PERFORMANCE.md ("Two-view augmentation pipeline").
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from harness.data.pipeline_bench import benchmark_images, make_seed_loader, ours_epoch, seed_epoch

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
N_IMAGES = 4096
BATCH = 256
GROUP = "two-view-pipeline"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist (installed on CI)"),
]

# images/s of each pipeline, filled by the tests in file order, read by the summary.
RATES: dict[str, float] = {}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return benchmark_images(N_IMAGES)


def timed(run: Callable[[], int], seconds: list[float]) -> Callable[[], int]:
    """``run`` that also appends its own duration, so rates exist with --benchmark-disable too."""

    def wrapper() -> int:
        start = time.perf_counter()
        seen = run()
        seconds.append(time.perf_counter() - start)
        return seen

    return wrapper


def record(benchmark: pytest.FixtureRequest, key: str, seconds: list[float], seen: int) -> float:
    rate = seen / statistics.median(seconds)
    RATES[key] = rate
    benchmark.extra_info.update(
        images=seen, batch_size=BATCH, images_per_s=round(rate, 1), torch_threads=torch.get_num_threads()
    )
    return rate


@pytest.mark.benchmark(group=GROUP)
def test_pipeline__seed_notebook(benchmark: pytest.FixtureRequest, images: torch.Tensor) -> None:
    loader = make_seed_loader(images, batch_size=BATCH, num_workers=2)
    seconds: list[float] = []
    # Warm-up round: starts the (persistent) workers, which a training run pays once.
    seen = benchmark.pedantic(
        timed(lambda: seed_epoch(loader), seconds), rounds=3, warmup_rounds=1, iterations=1
    )
    assert seen == N_IMAGES
    record(benchmark, "seed", seconds[-3:], seen)


@pytest.mark.benchmark(group=GROUP)
def test_pipeline__ours(
    benchmark: pytest.FixtureRequest, images: torch.Tensor, capsys: pytest.CaptureFixture[str]
) -> None:
    generator = torch.Generator().manual_seed(0)
    order_generator = torch.Generator().manual_seed(0)
    seconds: list[float] = []

    def run() -> int:
        return ours_epoch(images, batch_size=BATCH, generator=generator, order_generator=order_generator)

    seen = benchmark.pedantic(timed(run, seconds), rounds=5, warmup_rounds=1, iterations=1)
    assert seen == N_IMAGES
    ours = record(benchmark, "ours", seconds[-5:], seen)
    if "seed" in RATES:
        ratio = ours / RATES["seed"]
        benchmark.extra_info["ratio_vs_seed"] = round(ratio, 2)
        with capsys.disabled():
            print(
                f"\ntwo-view pipeline, {N_IMAGES} Fashion-MNIST images, batch {BATCH}: "
                f"ours {ours:,.0f} img/s, seed notebook (PIL, DataLoader num_workers=2) "
                f"{RATES['seed']:,.0f} img/s, ratio {ratio:.1f}x"
            )
