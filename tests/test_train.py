"""One trial end to end: train, evaluate, measure; failures are results with reasons."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from harness import train
from harness.db import PROVENANCE_FIELDS, SUMMARY_METRICS
from harness.spec import resolve

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

TINY = {
    "dataset": "synthetic",
    "train_size": 96,
    "test_size": 40,
    "batch_size": 32,
    "epochs": 2,
    "knn_k": 5,
    "linear_epochs": 3,
    "log_every": 1,
}


def _tiny(**overrides: object) -> train.TrialConfig:
    return resolve({**TINY, "proj_hidden_dim": 32, "proj_dim": 16, **overrides})


def test_run_trial__records_every_summary_metric_and_curves() -> None:
    record = train.run_trial(_tiny(method="simclr"), progress=False)
    assert record.status == "complete", record.reason
    assert set(record.summary) == set(SUMMARY_METRICS)
    for name in ("knn_top1", "linear_top1", "linear_top5"):
        assert 0.0 <= record.summary[name] <= 1.0
    assert record.summary["linear_top5"] >= record.summary["linear_top1"]
    assert record.summary["train_img_per_s"] > 0
    assert record.summary["peak_mem_bytes"] >= 0
    assert record.summary["train_seconds"] > 0 and record.summary["eval_seconds"] > 0
    assert 0.0 <= record.summary["alignment"] <= 4.0  # squared distance of unit vectors
    assert record.summary["uniformity"] <= 0.0
    assert 1.0 <= record.summary["effective_rank"] <= 256
    assert math.isfinite(record.summary["final_loss"])
    names = {name for _, _, name, _ in record.curves}
    assert {"loss", "lr", "knn_top1"} <= names
    steps = [step for _, step, name, _ in record.curves if name == "loss"]
    assert steps == sorted(steps) and steps[-1] == 2 * (96 // 32)
    knn_epochs = [epoch for epoch, _, name, _ in record.curves if name == "knn_top1"]
    assert knn_epochs == [1.0, 2.0]
    assert set(record.provenance) == set(PROVENANCE_FIELDS)
    assert record.provenance["torch_version"] == torch.__version__


def test_run_trial__same_seed_gives_the_same_result() -> None:
    first = train.run_trial(_tiny(epochs=1), progress=False)
    second = train.run_trial(_tiny(epochs=1), progress=False)
    assert first.summary["final_loss"] == second.summary["final_loss"]
    assert first.summary["knn_top1"] == second.summary["knn_top1"]


@pytest.mark.parametrize("compiled", [False, True])
def test_run_trial__compile_augmentation_reaches_every_training_batch(
    monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    seen: list[object] = []
    make_views = train.make_views

    def recording(*args: object, **kwargs: object) -> object:
        if "compiled" in kwargs:  # the training batches (evaluation's views are always eager)
            seen.append(kwargs["compiled"])
        # The compiled chain itself is tested against the eager one in tests/test_augment.py.
        return make_views(*args, **{**kwargs, "compiled": False})

    monkeypatch.setattr(train, "make_views", recording)
    record = train.run_trial(_tiny(epochs=1, compile_augmentation=compiled), progress=False)
    assert record.status == "complete", record.reason
    assert seen == [compiled] * 3  # 96 images at batch 32


def test_run_trial__divergence_is_a_failed_record_with_the_step() -> None:
    record = train.run_trial(_tiny(optimizer="sgd", lr=1e30, epochs=1), progress=False)
    assert record.status == "failed"
    assert record.reason is not None and record.reason.startswith("diverged at step ")
    step = int(record.reason.split()[3])
    assert 1 <= step <= 3


def test_run_trial__an_exception_in_the_method_is_a_failed_record(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> torch.Tensor:
        raise RuntimeError("boom")

    from harness.methods import METHODS

    monkeypatch.setattr(METHODS["simclr"], "training_loss", broken)
    record = train.run_trial(_tiny(epochs=1), progress=False)
    assert record.status == "failed"
    assert "RuntimeError: boom" in record.reason


def test_run_trial__out_of_memory_is_a_failed_record(monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(*_args: object, **_kwargs: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB")

    from harness.methods import METHODS

    monkeypatch.setattr(METHODS["simclr"], "training_loss", oom)
    record = train.run_trial(_tiny(epochs=1), progress=False)
    assert (record.status, record.reason) == ("failed", "out of memory")


def test_run_trial__on_eval_can_prune() -> None:
    seen: list[tuple[int, float]] = []

    def prune(epoch: int, knn: float) -> None:
        seen.append((epoch, knn))
        raise train.TrialPruned(f"pruned at epoch {epoch}")

    record = train.run_trial(_tiny(epochs=3), on_eval=prune, progress=False)
    assert record.status == "pruned" and record.reason == "pruned at epoch 1"
    assert len(seen) == 1 and 0.0 <= seen[0][1] <= 1.0
    assert any(name == "loss" for _, _, name, _ in record.curves)


def test_run_trial__random_init_trains_nothing_but_is_evaluated() -> None:
    record = train.run_trial(_tiny(method="random_init"), progress=False)
    assert record.status == "complete", record.reason
    assert record.summary["final_loss"] is None
    assert record.summary["train_img_per_s"] is None
    assert 0.0 <= record.summary["knn_top1"] <= 1.0
    # Its one k-NN point is the untrained state: epoch 0, step 0 (not its reset epochs knob's end).
    assert [(epoch, step) for epoch, step, name, _ in record.curves if name == "knn_top1"] == [(0.0, 0)]


def test_run_trial__unavailable_cuda_is_a_failed_record() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    record = train.run_trial(_tiny(device="cuda", epochs=1), progress=False)
    assert record.status == "failed" and "CUDA is not available" in record.reason


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_run_trial__simclr_on_5k_fashion_mnist_for_2_epochs() -> None:
    """The acceptance trial of the issue: real data, every metric, sensible values."""
    config = resolve(
        {"method": "simclr", "dataset": "fashion-mnist", "train_size": 5000, "test_size": 1000, "epochs": 2,
         "linear_epochs": 20}
    )
    record = train.run_trial(config, progress=False)
    assert record.status == "complete", record.reason
    assert all(record.summary[name] is not None for name in SUMMARY_METRICS)
    # Far above chance (10 classes) after two epochs on real data.
    assert record.summary["knn_top1"] > 0.5
    assert record.summary["linear_top1"] > 0.5
    assert record.summary["peak_mem_bytes"] > 0


def test_run_trial__cpu_peak_memory_of_a_later_trial_is_not_lost_to_reused_memory() -> None:
    # Without handing freed memory back first, simclr after simsiam and barlow_twins read ~0 MiB.
    sizes = {"train_size": 256, "test_size": 64, "batch_size": 64, "epochs": 1}
    records = [
        train.run_trial(resolve({**TINY, **sizes, "method": method}), progress=False)
        for method in ("simclr", "simsiam", "barlow_twins", "simclr")
    ]
    assert all(record.status == "complete" for record in records)
    first, again = records[0].summary["peak_mem_bytes"], records[-1].summary["peak_mem_bytes"]
    assert again > 0.5 * first > 0
