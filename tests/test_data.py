"""Datasets: loading, subsets, caches, errors (no downloads; Fashion-MNIST from the Debian package)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.data import (
    DATASETS,
    FOLDER_DATASETS,
    DatasetNotFoundError,
    ImageDataset,
    balanced_subset_indices,
    cache_dir,
    clear_cache,
    load_dataset,
)
from harness.data import datasets as datasets_module
from harness.data.datasets import read_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own disk cache and an empty in-process cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(folder))
    monkeypatch.delenv("HARNESS_DATA_ROOT", raising=False)
    clear_cache()
    yield folder
    clear_cache()


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> None:
    """Write a uint8 array as an IDX file (gzip-compressed when ``compress``)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def write_fake_fashion(folder: Path, *, n: int = 40, fill: int | None = None, compress: bool = True) -> np.ndarray:
    """Tiny Fashion-MNIST-shaped IDX files for both splits; returns the train images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    if fill is not None:
        images[:] = fill
    labels = (np.arange(n) % 10).astype(np.uint8)
    suffix = ".gz" if compress else ""
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress=compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress=compress)
    return images


@pytest.fixture
def no_system_fashion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    missing = tmp_path / "no-system-dir"
    monkeypatch.setattr(datasets_module, "SYSTEM_FASHION_MNIST_DIR", missing)
    return missing


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST


@needs_fashion
def test_load_dataset__fashion_mnist_test_split_shapes() -> None:
    ds = load_dataset("fashion-mnist", "test")
    assert ds.images.shape == (10000, 1, 28, 28)
    assert ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (10000,)
    assert ds.num_classes == 10 and ds.name == "fashion-mnist" and ds.split == "test"
    assert ds.channels == 1 and ds.image_size == 28 and len(ds) == 10000
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    assert len(ds.mean) == 1 and len(ds.std) == 1 and len(ds.class_names) == 10


@needs_fashion
def test_load_dataset__fashion_mnist_repeat_load_uses_cache(isolated_cache: Path) -> None:
    first = load_dataset("fashion-mnist", "test")
    assert list((isolated_cache / "datasets").glob("fashion-mnist-test-*.pt"))
    clear_cache()  # only the disk cache is left
    second = load_dataset("fashion-mnist", "test")
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


@pytest.mark.parametrize("layout", ["direct-gz", "direct-raw", "torchvision"])
def test_load_dataset__fashion_mnist_from_root(tmp_path: Path, no_system_fashion: Path, layout: str) -> None:
    root = tmp_path / "root"
    folder = root / "FashionMNIST" / "raw" if layout == "torchvision" else root
    expected = write_fake_fashion(folder, compress=layout != "direct-raw")
    ds = load_dataset("fashion-mnist", root=root)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(expected))
    assert ds.labels.tolist() == [i % 10 for i in range(40)]


def test_load_dataset__fashion_mnist_from_env_root(
    tmp_path: Path, no_system_fashion: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_fashion(tmp_path / "env", fill=7)
    monkeypatch.setenv("HARNESS_DATA_ROOT", str(tmp_path / "env"))
    assert int(load_dataset("fashion-mnist", "test").images.max()) == 7


def test_load_dataset__root_searched_before_env(
    tmp_path: Path, no_system_fashion: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_fashion(tmp_path / "env", fill=7)
    write_fake_fashion(tmp_path / "root", fill=9)
    monkeypatch.setenv("HARNESS_DATA_ROOT", str(tmp_path / "env"))
    assert int(load_dataset("fashion-mnist", root=tmp_path / "root").images.max()) == 9


def test_load_dataset__disk_cache_reused_without_decoding(
    tmp_path: Path, no_system_fashion: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_fashion(tmp_path / "root")
    first = load_dataset("fashion-mnist", root=tmp_path / "root")
    assert len(list((isolated_cache / "datasets").glob("fashion-mnist-train-*.pt"))) == 1
    clear_cache()

    def fail(path: object) -> np.ndarray:
        raise AssertionError(f"decoded {path} again instead of using the cache")

    monkeypatch.setattr(datasets_module, "read_idx", fail)
    second = load_dataset("fashion-mnist", root=tmp_path / "root")
    assert torch.equal(first.images, second.images)


def test_load_dataset__memory_cache_reused(
    tmp_path: Path, no_system_fashion: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_fashion(tmp_path / "root")
    first = load_dataset("fashion-mnist", root=tmp_path / "root")
    for path in (isolated_cache / "datasets").glob("*.pt"):
        path.unlink()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("read the disk cache"))
    second = load_dataset("fashion-mnist", root=tmp_path / "root")
    assert second.images.data_ptr() == first.images.data_ptr()


def test_load_dataset__cache_rebuilt_when_source_changes(
    tmp_path: Path, no_system_fashion: Path, isolated_cache: Path
) -> None:
    root = tmp_path / "root"
    write_fake_fashion(root, fill=3)
    assert int(load_dataset("fashion-mnist", root=root).images.max()) == 3
    old_files = set((isolated_cache / "datasets").glob("fashion-mnist-train-*.pt"))

    write_fake_fashion(root, fill=200)
    images = root / "train-images-idx3-ubyte.gz"
    stat = images.stat()
    os.utime(images, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    assert int(load_dataset("fashion-mnist", root=root).images.max()) == 200  # the in-process cache too

    clear_cache()
    assert int(load_dataset("fashion-mnist", root=root).images.max()) == 200
    new_files = set((isolated_cache / "datasets").glob("fashion-mnist-train-*.pt"))
    assert len(new_files) == 1 and not (new_files & old_files)  # the stale file was removed


def test_load_dataset__missing_fashion_lists_every_place(
    tmp_path: Path, no_system_fashion: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HARNESS_DATA_ROOT", str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", root=tmp_path / "root")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for place in (tmp_path / "root", tmp_path / "root" / "FashionMNIST" / "raw", tmp_path / "env", no_system_fashion):
        assert str(place) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "root=" in message and "download=True" in message


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "stl10"])
def test_load_dataset__missing_torchvision_dataset_lists_root(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, "test", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "download=True" in message and "root=" in message


def test_load_dataset__unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as info:
        load_dataset("imagenet")
    assert all(name in str(info.value) for name in DATASETS)


def test_load_dataset__bad_split() -> None:
    with pytest.raises(ValueError, match="split 'val'"):
        load_dataset("synthetic", "val")


def test_read_idx__bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x03\x04" + bytes(16))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)


def test_read_idx__truncated_payload(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + bytes(5))
    with pytest.raises(ValueError, match="IDX header says"):
        read_idx(path)


def test_cache_dir__follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path / "datasets"


# ----------------------------------------------------------------------------------------------
# The registry contract


def _available(name: str) -> bool:
    if name == "fashion-mnist":
        return FASHION_DIR.is_dir()
    return name != "mnist"  # the others are written in their own formats by _written_root


@pytest.fixture(scope="module")
def _written_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data root with CIFAR-10/100 and STL-10 in their real formats and an image folder of the
    100 ImageNet-100 classes (so `imagefolder` and `imagenet100` both read it)."""
    from data_writers import write_cifar10, write_cifar100, write_folder, write_stl10

    from harness.data.formats import imagenet100_classes

    root = tmp_path_factory.mktemp("written-datasets")
    write_cifar10(root, per_batch=4)
    write_cifar100(root)
    write_stl10(root)
    classes = dict.fromkeys(imagenet100_classes(), 1)
    write_folder(root / "train", classes, size=(12, 10))
    write_folder(root / "val", classes, size=(10, 12), seed=1)
    return root


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, id=name, marks=pytest.mark.skipif(not _available(name), reason=f"{name} not available offline"))
        for name in DATASETS
    ],
)
def test_datasets__contract(name: str, _written_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_DATA_ROOT", str(_written_root))
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(_written_root / "cache"))
    options = {"image_size": 8} if name in FOLDER_DATASETS else {}
    for split in ("train", "test"):
        ds = load_dataset(name, split, **options)
        assert isinstance(ds, ImageDataset)
        assert ds.images.dtype == torch.uint8 and ds.images.ndim == 4
        assert ds.labels.dtype == torch.int64 and ds.labels.shape == (len(ds),)
        assert int(ds.labels.min()) >= 0 and int(ds.labels.max()) < ds.num_classes
        assert ds.name == name and ds.split == split
        assert len(ds.mean) == ds.channels == len(ds.std)
        assert all(0 < s < 1 for s in ds.std) and all(0 < m < 1 for m in ds.mean)


# ----------------------------------------------------------------------------------------------
# Subsets


def test_load_dataset__subset_class_balanced_and_deterministic() -> None:
    a = load_dataset("synthetic", size=105, seed=3)
    b = load_dataset("synthetic", size=105, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    counts = torch.bincount(a.labels, minlength=10)
    assert sorted(counts.tolist()) == [10] * 5 + [11] * 5
    other = load_dataset("synthetic", size=105, seed=4)
    assert not torch.equal(a.images, other.images)


def test_load_dataset__subset_exact_multiple() -> None:
    assert torch.bincount(load_dataset("synthetic", "test", size=200).labels).tolist() == [20] * 10


def test_balanced_subset_indices__nested_across_sizes() -> None:
    labels = torch.arange(1000) % 10
    small = set(balanced_subset_indices(labels, 37, seed=1).tolist())
    large = set(balanced_subset_indices(labels, 150, seed=1).tolist())
    assert len(small) == 37 and small <= large


def test_balanced_subset_indices__short_class_gives_all_it_has() -> None:
    labels = torch.tensor([0] * 2 + [1] * 50 + [2] * 50)
    picked = labels[balanced_subset_indices(labels, 30, seed=0)]
    assert torch.bincount(picked).tolist() == [2, 14, 14]


def test_load_dataset__subset_too_large_names_dataset() -> None:
    with pytest.raises(ValueError, match=r"size=3000 exceeds the 2000 images of dataset 'synthetic'"):
        load_dataset("synthetic", "test", size=3000)


def test_load_dataset__subset_size_not_positive() -> None:
    with pytest.raises(ValueError, match="size must be positive"):
        load_dataset("synthetic", "test", size=0)


def test_load_dataset__subset_keeps_stats_and_num_classes() -> None:
    full = load_dataset("synthetic", "test")
    sub = load_dataset("synthetic", "test", size=50)
    assert sub.num_classes == full.num_classes and sub.mean == full.mean and sub.std == full.std


# ----------------------------------------------------------------------------------------------
# Synthetic and digits


def test_load_dataset__synthetic_deterministic_by_data_seed() -> None:
    small = {"num_train": 300, "num_test": 300}
    a = load_dataset("synthetic", "test", **small)
    clear_cache()
    b = load_dataset("synthetic", "test", **small)
    c = load_dataset("synthetic", "test", data_seed=1, **small)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert not torch.equal(a.images, load_dataset("synthetic", "train", **small).images)


def test_load_dataset__synthetic_options_shape() -> None:
    ds = load_dataset("synthetic", "train", channels=3, image_size=32, num_train=60, num_classes=4)
    assert ds.images.shape == (60, 3, 32, 32) and ds.num_classes == 4 and len(ds.mean) == 3
    assert torch.bincount(ds.labels).tolist() == [15] * 4


def test_load_dataset__synthetic_classes_are_separable() -> None:
    """A nearest-class-mean classifier on raw pixels beats chance by far: the classes have structure."""
    train = load_dataset("synthetic", "train", num_train=2000)
    test = load_dataset("synthetic", "test")
    x_train = train.images.flatten(1).float()
    means = torch.stack([x_train[train.labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(test.images.flatten(1).float(), means).argmin(1)
    assert (predicted == test.labels).float().mean() > 0.5


def test_load_dataset__synthetic_bad_option() -> None:
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        load_dataset("synthetic", channels=2)


def test_load_dataset__digits_split() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape[1:] == (1, 28, 28) and len(train) + len(test) == 1797
    assert 340 <= len(test) <= 380
    assert torch.equal(load_dataset("digits", "test").images, test.images)
    assert int(train.images.max()) > 200  # rescaled from 0..16 to 0..255


# ----------------------------------------------------------------------------------------------
# ImageDataset


def test_image_dataset__rejects_bad_tensors() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), 2, "x")
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), 2, "x")
    with pytest.raises(ValueError, match="one entry per channel"):
        ImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), 2, "x")


def test_image_dataset__frozen() -> None:
    ds = load_dataset("synthetic", "test", size=10)
    with pytest.raises(AttributeError):
        ds.name = "other"  # type: ignore[misc]


def test_image_dataset__to_same_device_is_noop() -> None:
    ds = load_dataset("synthetic", "test", size=10)
    assert ds.to("cpu") is ds and ds.device == torch.device("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_dataset__on_cuda() -> None:
    ds = load_dataset("synthetic", "test", size=20, device="cuda")
    assert ds.images.is_cuda and ds.labels.is_cuda and len(ds) == 20


def test_load_dataset__mnist_from_torchvision_root(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(1).integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = (np.arange(30) % 10).astype(np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, compress=False)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, compress=False)
    ds = load_dataset("mnist", "test", root=tmp_path, size=20)
    assert ds.images.shape == (20, 1, 28, 28) and ds.name == "mnist"
    assert torch.bincount(ds.labels).tolist() == [2] * 10
