"""Streamed batches (host memory / memory-mapped shards, prefetched) against the resident path, and
trials from image folders and unlabeled pretraining splits."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import train
from harness.data import iter_batches, load_dataset
from harness.data.datasets import read_idx
from harness.spec import resolve

FASHION = Path("/usr/share/datasets/fashion-mnist")

TINY = {
    "dataset": "synthetic",
    "train_size": 96,
    "test_size": 40,
    "batch_size": 32,
    "epochs": 2,
    "knn_k": 5,
    "linear_epochs": 3,
    "log_every": 1,
    "proj_hidden_dim": 32,
    "proj_dim": 16,
}


@pytest.fixture(autouse=True)
def _fresh_trial_cache() -> None:
    train._DATASETS.clear()


def test_iter_batches__streamed_equals_resident_indexing() -> None:
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    batches = [order[i : i + 16] for i in range(0, 48, 16)] + [slice(40, 50)]
    streamed = list(iter_batches(images, batches, torch.device("cpu"), stream=True, prefetch=1))
    expected = [images[b] for b in batches]
    assert all(torch.equal(a, b) for a, b in zip(streamed, expected))


def test_iter_batches__producer_thread_gathers_and_errors_reach_the_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    import harness.data.stream as stream

    images = torch.arange(40, dtype=torch.uint8).view(10, 1, 2, 2)
    threads: set[str] = set()
    real = stream._Streamer._gather

    def spy(self: stream._Streamer, b: torch.Tensor | slice) -> torch.Tensor:
        threads.add(threading.current_thread().name)
        if isinstance(b, torch.Tensor) and int(b[0]) == 7:
            raise RuntimeError("disk gone")
        return real(self, b)

    monkeypatch.setattr(stream._Streamer, "_gather", spy)
    streamer = stream._Streamer(images, [torch.tensor([0, 1]), torch.tensor([7])], torch.device("cpu"), 2)
    batches = iter(streamer)
    assert torch.equal(next(batches), images[[0, 1]])
    with pytest.raises(RuntimeError, match="disk gone"):
        next(batches)
    streamer.close()
    assert threads == {"harness-prefetch"} and not streamer.thread.is_alive()


def test_iter_batches__leaving_early_stops_the_thread() -> None:
    images = torch.zeros(100, 1, 4, 4, dtype=torch.uint8)
    before = threading.active_count()
    loop = iter_batches(images.cpu(), [slice(i, i + 1) for i in range(100)], torch.device("cpu"))
    # Resident (same device): no thread at all.
    next(loop)
    loop.close()
    assert threading.active_count() == before


def test_run_trial__streamed_is_bit_identical_to_resident(monkeypatch: pytest.MonkeyPatch) -> None:
    import harness.data.stream as stream

    gathered: list[int] = []
    real = stream._Streamer._gather
    monkeypatch.setattr(stream._Streamer, "_gather", lambda self, b: (gathered.append(1), real(self, b))[1])
    resident = train.run_trial(resolve({**TINY, "resident_share": 1.0}), progress=False)
    assert gathered == []
    train._DATASETS.clear()
    streamed = train.run_trial(resolve({**TINY, "resident_share": 1e-12}), progress=False)
    # 2 epochs x 3 steps, plus the alignment/uniformity batches of the streamed test split.
    assert len(gathered) >= 6
    assert resident.status == streamed.status == "complete", (resident.reason, streamed.reason)
    for name in ("final_loss", "knn_top1", "linear_top1", "alignment", "uniformity", "effective_rank"):
        assert resident.summary[name] == streamed.summary[name], name
    assert [c for c in resident.curves if c[2] == "loss"] == [c for c in streamed.curves if c[2] == "loss"]


def test_dataset__tiny_budget_streams_and_large_budget_is_resident() -> None:
    config = resolve({**TINY, "resident_share": 1e-12})
    streamed = train._dataset(config, "train", 96, torch.device("cpu"))
    resident = train._dataset(config.replace(resident_share=1.0), "train", 96, torch.device("cpu"))
    assert streamed.streamed and not resident.streamed
    assert torch.equal(streamed.images, resident.images)


# ----------------------------------------------------------------------------------------------
# Trials from folders and unlabeled splits


def _write_stl10(root: Path, n_train: int = 40, n_test: int = 20, n_unlabeled: int = 60) -> None:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        if split != "unlabeled":
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")


@pytest.mark.slow
def test_run_trial__pretrains_on_stl10_unlabeled_and_evaluates_on_labeled(tmp_path: Path) -> None:
    _write_stl10(tmp_path)
    base = {**TINY, "dataset": "stl10", "data_root": str(tmp_path), "train_size": None, "test_size": None,
            "epochs": 1, "batch_size": 20, "linear_epochs": 1}
    record = train.run_trial(resolve({**base, "pretrain_split": "train+unlabeled"}), progress=False)
    assert record.status == "complete", record.reason
    loss_steps = [step for _, step, name, _ in record.curves if name == "loss"]
    assert loss_steps[-1] == (40 + 60) // 20  # trained on both splits
    pretrain, evaluated = record.data["pretrain"], record.data["knn_probe_train"]
    assert pretrain["split"] == "train+unlabeled" and pretrain["images"] == 100 and pretrain["labeled"] == 40
    assert evaluated["split"] == "train" and sum(evaluated["class_counts"].values()) == 40
    assert record.data["knn_probe_test"]["class_counts"]["airplane"] == 2
    supervised = train.run_trial(resolve({**base, "method": "supervised", "pretrain_split": "unlabeled"}), progress=False)
    assert supervised.status == "failed" and "pretrain_split='unlabeled'" in supervised.reason


def _write_fashion_folder(root: Path, split: str, count: int) -> None:
    """Fashion-MNIST images as files: PNG, and every fifth one JPEG (quality 95)."""
    from PIL import Image

    from harness.data.datasets import FASHION_MNIST_CLASSES

    prefix = "train" if split == "train" else "t10k"
    images = read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz")[:count]
    labels = read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz")[:count]
    for i, (pixels, label) in enumerate(zip(images, labels)):
        folder = root / ("train" if split == "train" else "val") / FASHION_MNIST_CLASSES[label].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels, "L")
        if i % 5 == 0:
            image.save(folder / f"{i:05d}.jpg", quality=95)
        else:
            image.save(folder / f"{i:05d}.png")


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="needs Debian's dataset-fashion-mnist")
def test_harness_run__image_folder_trial_matches_the_in_memory_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 000 Fashion-MNIST images written as PNG/JPEG files, prepared, trained on with `harness
    run`; its k-NN accuracy is that of the same trial on the built-in dataset, within noise."""
    from harness import cli
    from harness.results import trials_frame

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "fashion-folder"
    _write_fashion_folder(data, "train", 2000)
    _write_fashion_folder(data, "test", 1000)
    common = "  epochs: 1\n  batch_size: 128\n  knn_k: 20\n  linear_epochs: 1\n  device: cpu\n"
    (tmp_path / "folder.yaml").write_text(
        "study: folder\ndataset: imagefolder\nfixed:\n" + common
        + f"  data_root: {data}\n  image_size: 28\n  resident_share: 1.0e-12\ngrid:\n  method: [simclr]\nseeds: [0]\n"
    )
    (tmp_path / "memory.yaml").write_text(
        "study: memory\ndataset: fashion-mnist\nfixed:\n" + common
        + "  train_size: 2000\n  test_size: 1000\ngrid:\n  method: [simclr]\nseeds: [0]\n"
    )
    db = str(tmp_path / "h.db")
    assert cli.main(["run", str(tmp_path / "folder.yaml"), "--db", db]) == 0
    assert cli.main(["run", str(tmp_path / "memory.yaml"), "--db", db]) == 0
    folder = trials_frame(db, "folder").iloc[0]
    memory = trials_frame(db, "memory").iloc[0]
    assert folder["status"] == memory["status"] == "complete", (folder["failure_reason"], memory["failure_reason"])
    shard = load_dataset("imagefolder", "train", root=data, image_size=28)
    assert shard.channels == 1 and len(shard) == 2000 and sum(shard.source.class_counts.values()) == 2000
    # Different subsets of the same distribution (the first 2 000 files vs a balanced draw) and a
    # few JPEG-compressed images: k-NN agrees within a few points at 1 000 test images.
    assert abs(folder["knn_top1"] - memory["knn_top1"]) < 0.06, (folder["knn_top1"], memory["knn_top1"])
    assert folder["knn_top1"] > 0.5
