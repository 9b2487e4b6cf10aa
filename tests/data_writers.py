"""Writers of datasets in their real on-disk formats, for the tests (no download here)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_cifar10(root: Path, per_batch: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """cifar-10-batches-py/ as the Python 2 pickles of the original tarball (byte-string keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    all_images, all_labels = [], []
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(folder / name, "wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, handle, protocol=2)
        if name != "test_batch":
            all_images.append(data)
            all_labels.extend(labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, handle, protocol=2)
    return np.concatenate(all_images), np.asarray(all_labels)


def write_stl10(root: Path, n_train: int = 12, n_test: int = 8, n_unlabeled: int = 16) -> dict[str, np.ndarray]:
    """stl10_binary/: each image channel by channel, each channel column-major; labels 1..10."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    images = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        pixels = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)  # (N, C, H, W) row-major
        np.ascontiguousarray(pixels.transpose(0, 1, 3, 2)).tofile(folder / f"{split}_X.bin")
        images[split] = pixels
        if split != "unlabeled":
            labels = (np.arange(n) % 10 + 1).astype(np.uint8)
            labels.tofile(folder / f"{split}_y.bin")
            images[f"{split}_y"] = labels.astype(np.int64) - 1
    (folder / "class_names.txt").write_text("airplane\nbird\ncar\ncat\ndeer\ndog\nhorse\nmonkey\nship\ntruck\n")
    return images


def write_folder(root: Path, classes: dict[str, int], *, size: tuple[int, int] = (40, 30), mode: str = "RGB",
                 ext: str = "png", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
            pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
            image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
            image.save(root / name / f"{i:04d}.{ext}")




def write_cifar100(root: Path, count: int = 8) -> None:
    """cifar-100-python/: train, test and meta pickles with fine and coarse labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        fine = [int(v) for v in np.arange(count) % 100]
        with open(folder / split, "wb") as handle:
            pickle.dump({b"data": data, b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine]}, handle, protocol=2)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": []}, handle, protocol=2)
