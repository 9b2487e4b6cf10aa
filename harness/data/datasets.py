"""Datasets loaded once into uint8 tensors ``(N, C, H, W)``.

Every loader in :data:`DATASETS` returns the *full* split on the CPU; :func:`load_dataset` then takes
the class-balanced subset and moves the result to the device. Decoded arrays are cached in-process
and, for the IDX files of Fashion-MNIST, on disk (see :func:`cache_dir`), because decoding the gzip
files takes seconds and a study loads the same dataset for every trial.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATASETS",
    "FOLDER_DATASETS",
    "SPLITS",
    "DatasetNotFoundError",
    "ImageDataset",
    "balanced_subset_indices",
    "cache_dir",
    "clear_cache",
    "load_dataset",
    "prepare_command",
    "read_idx",
    "shard_for",
]

SPLITS: tuple[str, ...] = ("train", "test", "unlabeled")

# Where Debian's `dataset-fashion-mnist` package installs the four IDX files. A module attribute
# (not a constant inlined in the search) so that tests can point it at an empty folder.
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Bump when the on-disk cache format changes so that old files are never misread.
_CACHE_FORMAT = 1

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
STL10_CLASSES: tuple[str, ...] = (
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
)

# Per-channel statistics of the *train* split in [0, 1] units (the commonly published figures),
# used for both splits so that test images are normalized exactly like training images.
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files were not found; the message lists every place looked and how to get it."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """One split of an image dataset, resident on one device.

    Attributes:
        images: uint8 ``(N, C, H, W)``, values in [0, 255]. Shared with the in-process cache on the
            CPU: treat it as read-only.
        labels: int64 ``(N,)`` in ``[0, num_classes)``, on the same device as ``images``.
        num_classes: number of classes of the full dataset (a subset keeps it).
        name: registry name, e.g. ``"fashion-mnist"``.
        split: ``"train"`` or ``"test"``.
        mean, std: per-channel statistics of the train split in [0, 1] units, one entry per
            channel, for :func:`harness.data.normalize` and the augmentation pipeline.
        class_names: human-readable class names (may be empty).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    split: str = "train"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    class_names: tuple[str, ...] = field(default=())
    mapped: bool = False
    """``images`` is a memory map of a file (a prepared shard, STL-10's binaries): nothing is in
    memory until indexed. :meth:`resident` loads it."""
    streamed: bool = False
    """The images stay in host memory (or a memory map) and the labels sit on the compute device:
    batches are gathered, prefetched and copied per step (:func:`harness.data.iter_batches`)."""
    source: Any = None
    """Where the images came from when that is worth recording: the :class:`ShardMeta` of a
    prepared image folder (class counts, fingerprint, skipped files), else None."""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"ImageDataset.images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} "
                f"with shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"ImageDataset.labels must be int64 of shape ({self.images.shape[0]},), got "
                f"{self.labels.dtype} with shape {tuple(self.labels.shape)}"
            )
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"ImageDataset.mean/std need one entry per channel ({channels}), got "
                f"mean={self.mean}, std={self.std}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        """Number of channels C."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Height H of the (square) images."""
        return int(self.images.shape[2])

    @property
    def device(self) -> torch.device:
        """Device holding ``images`` and ``labels``."""
        return self.images.device

    def to(self, device: str | torch.device) -> ImageDataset:
        """The same dataset on ``device`` (``self`` when already there)."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        return _replace_tensors(self, self.images.to(device), self.labels.to(device))

    def resident(self, device: str | torch.device) -> ImageDataset:
        """The dataset loaded whole into ``device``'s memory (a memory map is read into RAM)."""
        device = torch.device(device)
        if self.images.device == device and not self.mapped and not self.streamed:
            return self
        images = self.images.to(device, copy=self.mapped and self.images.device == device)
        return _replace_tensors(self, images, self.labels.to(device))

    def streaming(self, device: str | torch.device) -> ImageDataset:
        """The dataset with its images left in host memory (a memory map stays one) and its labels
        on ``device``, for the streamed path."""
        return _replace_tensors(self, self.images.cpu(), self.labels.to(device), mapped=self.mapped, streamed=True)

    def subset(self, size: int, *, seed: int = 0) -> ImageDataset:
        """A deterministic class-balanced subset of ``size`` images (see :func:`balanced_subset_indices`)."""
        index = balanced_subset_indices(self.labels.cpu(), size, seed=seed, name=self.name)
        index = index.to(self.images.device)
        return _replace_tensors(self, self.images.index_select(0, index), self.labels.index_select(0, index))


def _replace_tensors(
    ds: ImageDataset, images: torch.Tensor, labels: torch.Tensor, *, mapped: bool = False, streamed: bool = False
) -> ImageDataset:
    return ImageDataset(
        images=images, labels=labels, num_classes=ds.num_classes, name=ds.name, split=ds.split,
        mean=ds.mean, std=ds.std, class_names=ds.class_names, mapped=mapped, streamed=streamed, source=ds.source,
    )


DatasetLoader = Callable[..., ImageDataset]
"""``loader(split, *, root=None, download=False, **options) -> ImageDataset`` (full split, CPU)."""


# ----------------------------------------------------------------------------------------------
# Subsets


def balanced_subset_indices(labels: torch.Tensor, size: int, *, seed: int = 0, name: str = "dataset") -> torch.Tensor:
    """Indices (sorted, int64 ``(size,)``) of a deterministic, class-balanced subset.

    Every class gets ``size // K`` images; the ``size % K`` remaining ones go to classes picked by a
    seeded permutation. A class with too few images gives all it has and the deficit is spread over
    the others. Subsets are nested: for one seed, the subset of size n is contained in that of size
    m > n, so growing ``train_size`` only adds images.

    Raises:
        ValueError: ``size`` is not positive or exceeds the number of images.
    """
    labels = labels.cpu()
    total = int(labels.shape[0])
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise TypeError(f"size must be an int, got {type(size).__name__}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size} for dataset {name!r}")
    if size > total:
        raise ValueError(f"size={size} exceeds the {total} images of dataset {name!r}")
    classes = torch.unique(labels)
    counts = torch.stack([(labels == c).sum() for c in classes]).tolist()
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(classes), generator=generator).tolist()
    # Draw every class's permutation before looking at `size`, so subsets are nested across sizes.
    members = [torch.nonzero(labels == c, as_tuple=True)[0] for c in classes]
    perms = [m[torch.randperm(len(m), generator=generator)] for m in members]

    quota = [0] * len(classes)
    remaining = int(size)
    while remaining > 0:
        active = [k for k in order if quota[k] < counts[k]]
        share = remaining // len(active)
        if share == 0:
            for k in active[:remaining]:
                quota[k] += 1
            break
        for k in active:
            take = min(share, counts[k] - quota[k])
            quota[k] += take
            remaining -= take
    chosen = torch.cat([perm[:q] for perm, q in zip(perms, quota)])
    return torch.sort(chosen).values


# ----------------------------------------------------------------------------------------------
# Caches


_MEMORY_CACHE: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
_MEMORY_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget the in-process cache of decoded and generated datasets (the disk cache stays)."""
    with _MEMORY_LOCK:
        _MEMORY_CACHE.clear()


def cache_dir() -> Path:
    """Folder of the on-disk dataset cache.

    ``$HARNESS_CACHE_DIR/datasets`` if set, else ``$XDG_CACHE_HOME/harness/datasets``, else
    ``~/.cache/harness/datasets``.
    """
    explicit = os.environ.get("HARNESS_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser() / "datasets"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "harness" / "datasets"


def _source_key(paths: Sequence[Path]) -> str:
    """Hash of the resolved paths, sizes and modification times: changes when a source changes."""
    parts = []
    for path in paths:
        stat = path.stat()
        parts.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps([_CACHE_FORMAT, parts]).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _cached_decode(
    name: str, sources: Sequence[Path], decode: Callable[[], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode()`` once per version of the source files: in-process first, then on disk, then for real.

    The file name is ``{name}-{hash of the paths}-{hash of paths, sizes, mtimes}.pt``: a new version
    of a source replaces its own older cache file, never that of another copy of the dataset.
    """
    where = hashlib.sha256(json.dumps([str(p.resolve()) for p in sources]).encode()).hexdigest()[:8]
    stem = f"{name}-{where}"
    key = _source_key(sources)
    with _MEMORY_LOCK:
        hit = _MEMORY_CACHE.get((stem, key))
    if hit is not None:
        return hit

    folder = cache_dir()
    path = folder / f"{stem}-{key}.pt"
    result: tuple[torch.Tensor, torch.Tensor] | None = None
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            result = (blob["images"], blob["labels"])
        except Exception as exc:  # a truncated or foreign file: rebuild it
            warnings.warn(f"ignoring unreadable dataset cache {path}: {exc}", stacklevel=3)
    if result is None:
        result = decode()
        _write_cache(folder, path, stem, result)
    with _MEMORY_LOCK:
        # Forget older versions of the same source: only the current one can be asked for again.
        for stale in [k for k in _MEMORY_CACHE if k[0] == stem]:
            del _MEMORY_CACHE[stale]
        _MEMORY_CACHE[(stem, key)] = result
    return result


def _write_cache(folder: Path, path: Path, stem: str, result: tuple[torch.Tensor, torch.Tensor]) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Write then rename, so that a concurrent worker never reads a half-written file.
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        torch.save({"images": result[0], "labels": result[1]}, tmp)
        os.replace(tmp, path)
        # Drop caches of older versions of the same source so the folder does not grow forever.
        for stale in folder.glob(f"{stem}-*.pt"):
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError as exc:
        warnings.warn(f"could not write the dataset cache {path}: {exc}; decoding again next time", stacklevel=4)


# ----------------------------------------------------------------------------------------------
# IDX files (MNIST family)


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Decode one IDX file (gzip-compressed if its name ends in ``.gz``) into a numpy array.

    Raises:
        ValueError: the header is not a valid IDX header or the payload has the wrong length.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes), file has {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _find_idx_pair(folder: Path, split: str) -> tuple[Path, Path] | None:
    prefix = _IDX_PREFIX[split]
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        base = folder / f"{prefix}-{kind}-ubyte"
        hit = next((p for p in (base.with_name(base.name + ".gz"), base) if p.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def _candidate_roots(root: str | Path | None) -> list[Path]:
    roots = []
    if root is not None:
        roots.append(Path(root).expanduser())
    env = os.environ.get("HARNESS_DATA_ROOT")
    if env:
        roots.append(Path(env).expanduser())
    return roots


def _download_root(root: str | Path | None) -> Path:
    roots = _candidate_roots(root)
    return roots[0] if roots else cache_dir().parent / "torchvision"


def _load_fashion_mnist(split: str, *, root: str | Path | None = None, download: bool = False) -> ImageDataset:
    folders: list[Path] = []
    for base in _candidate_roots(root):
        folders += [base, base / "FashionMNIST" / "raw", base / "fashion-mnist"]
    folders.append(SYSTEM_FASHION_MNIST_DIR)
    pair = None
    for folder in folders:
        pair = _find_idx_pair(folder, split)
        if pair is not None:
            break
    if pair is None and download:
        import torchvision

        target = _download_root(root)
        torchvision.datasets.FashionMNIST(str(target), train=split == "train", download=True)
        folders.insert(0, target / "FashionMNIST" / "raw")
        pair = _find_idx_pair(folders[0], split)
    if pair is None:
        prefix = _IDX_PREFIX[split]
        raise DatasetNotFoundError(
            f"Fashion-MNIST ({split} split) not found: looked for {prefix}-images-idx3-ubyte[.gz] and "
            f"{prefix}-labels-idx1-ubyte[.gz] in\n"
            + "".join(f"  {f}\n" for f in folders)
            + "Get it with `sudo apt-get install dataset-fashion-mnist` (installs "
            f"{SYSTEM_FASHION_MNIST_DIR}), or pass root=<folder with the four files or a torchvision "
            "root holding FashionMNIST/raw>, or set HARNESS_DATA_ROOT, or pass download=True where a "
            "network exists."
        )
    images_path, labels_path = pair

    def decode() -> tuple[torch.Tensor, torch.Tensor]:
        images = read_idx(images_path)
        labels = read_idx(labels_path)
        if images.ndim != 3 or labels.shape != (images.shape[0],):
            raise ValueError(f"{images_path} / {labels_path}: shapes {images.shape} and {labels.shape} do not match")
        return (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))

    images, labels = _cached_decode(f"fashion-mnist-{split}", [images_path, labels_path], decode)
    mean, std = _STATS["fashion-mnist"]
    return ImageDataset(images, labels, 10, "fashion-mnist", split, mean, std, FASHION_MNIST_CLASSES)


# ----------------------------------------------------------------------------------------------
# torchvision datasets (MNIST, CIFAR-10/100, STL-10)


def _torchvision_dataset(
    name: str, split: str, root: str | Path | None, download: bool, folder: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, C, H, W), labels int64 (N,)) of MNIST read by torchvision from a root."""
    import torchvision.datasets as tvd

    def build(base: Path, allow_download: bool) -> Any:
        return tvd.MNIST(str(base), train=split == "train", download=allow_download)

    roots = _candidate_roots(root)
    for base in roots:
        memory_key = (name, split, str(base.resolve()))
        with _MEMORY_LOCK:
            hit = _MEMORY_CACHE.get(memory_key)
        if hit is not None:
            return hit
        if not (base / folder).exists():
            continue
        try:
            dataset = build(base, False)
        except RuntimeError:  # torchvision's "Dataset not found or corrupted"
            continue
        result = (dataset.data.unsqueeze(1).contiguous(), dataset.targets.to(torch.int64))
        with _MEMORY_LOCK:
            _MEMORY_CACHE[memory_key] = result
        return result
    if download:
        dataset = build(_download_root(root), True)
        return dataset.data.unsqueeze(1).contiguous(), dataset.targets.to(torch.int64)
    raise _not_found(name, split, roots, folder)


def _not_found(name: str, split: str, roots: Sequence[Path], folder: str) -> DatasetNotFoundError:
    looked = "".join(f"  {base / folder}\n" for base in roots) or "  (nowhere: no root given and HARNESS_DATA_ROOT unset)\n"
    return DatasetNotFoundError(
        f"{name} ({split} split) not found; looked for a torchvision-style dataset folder in\n{looked}"
        f"Pass root=<folder containing {folder}/> (or set HARNESS_DATA_ROOT), or pass download=True "
        "where a network exists to let torchvision fetch it there."
    )


def _load_mnist(split: str, *, root: str | Path | None = None, download: bool = False) -> ImageDataset:
    """MNIST from a torchvision root (``MNIST/raw`` IDX files)."""
    images, labels = _torchvision_dataset("mnist", split, root, download, "MNIST")
    mean, std = _STATS["mnist"]
    return ImageDataset(images, labels, 10, "mnist", split, mean, std, tuple(str(d) for d in range(10)))


# ----------------------------------------------------------------------------------------------
# CIFAR-10/100 (pickle batches) and STL-10 (binary files), read by harness.data.formats


# name -> (folder, a file that marks it, number of classes, torchvision class to download with)
_NATIVE: dict[str, tuple[str, str, int, str]] = {
    "cifar10": ("cifar-10-batches-py", "batches.meta", 10, "CIFAR10"),
    "cifar100": ("cifar-100-python", "meta", 100, "CIFAR100"),
    "stl10": ("stl10_binary", "test_X.bin", 10, "STL10"),
}


def _native_folder(name: str, split: str, root: str | Path | None, download: bool) -> Path:
    """The dataset's own folder: ``base/FOLDER`` or ``base`` itself for each candidate base."""
    folder, marker, _, tv_class = _NATIVE[name]
    roots = _candidate_roots(root)
    for base in roots:
        for candidate in (base / folder, base):
            if (candidate / marker).is_file():
                return candidate
    if download:
        import torchvision.datasets as tvd

        target = _download_root(root)
        kwargs: dict[str, Any] = {"split": "train"} if name == "stl10" else {"train": True}
        getattr(tvd, tv_class)(str(target), download=True, **kwargs)
        return target / folder
    raise _not_found(name, split, roots, folder)


def _load_native(name: str, split: str, root: str | Path | None, download: bool) -> ImageDataset:
    from harness.data import formats

    folder = _native_folder(name, split, root, download)
    if split == "unlabeled" and name != "stl10":
        raise ValueError(f"{name} has no unlabeled split (only stl10 and image folders have one)")
    marker = folder / (f"{split}_X.bin" if name == "stl10" else _NATIVE[name][1])
    key = (name, split, str(folder.resolve()), _source_key([marker]) if marker.is_file() else "")
    with _MEMORY_LOCK:
        hit = _MEMORY_CACHE.get(key)
    if hit is None:
        try:
            if name == "stl10":
                array, labels, names = formats.read_stl10(folder, split, mmap_mode="c")
            else:
                array, labels, names = formats.read_cifar(folder, split, hundred=name == "cifar100")
        except FileNotFoundError as missing:
            raise DatasetNotFoundError(f"{name} ({split} split): {missing}") from None
        hit = (torch.from_numpy(array), torch.from_numpy(np.ascontiguousarray(labels)), names)
        with _MEMORY_LOCK:
            _MEMORY_CACHE[key] = hit
    images, labels_t, names = hit
    mean, std = _STATS[name]
    default_names = {"cifar10": CIFAR10_CLASSES, "stl10": STL10_CLASSES}.get(name, ())
    return ImageDataset(
        images, labels_t, _NATIVE[name][2], name, split, mean, std, names or default_names, mapped=name == "stl10"
    )


def _native_loader(name: str) -> DatasetLoader:
    def load(split: str, *, root: str | Path | None = None, download: bool = False) -> ImageDataset:
        return _load_native(name, split, root, download)

    load.__doc__ = f"Load {name} from its own files (folder {_NATIVE[name][0]}/)."
    load.__name__ = f"_load_{name}"
    return load


# ----------------------------------------------------------------------------------------------
# Image folders, through prepared shards

# Datasets read from image folders through prepared shards (they take image_size, on_bad_image).
FOLDER_DATASETS: tuple[str, ...] = ("imagefolder", "imagenet100")
# Split -> folder names tried under the dataset root, in order.
FOLDER_SPLITS: dict[str, tuple[str, ...]] = {"train": ("train",), "test": ("val", "test"), "unlabeled": ("unlabeled",)}
DEFAULT_IMAGE_SIZE = 224


def _split_folder(name: str, split: str, root: str | Path | None) -> Path:
    roots = _candidate_roots(root)
    if not roots:
        raise DatasetNotFoundError(
            f"{name} needs data_root (or root=, or $HARNESS_DATA_ROOT) pointing at a folder with "
            f"train/CLASS/*.jpg and val/ or test/ likewise"
        )
    for base in roots:
        for folder in FOLDER_SPLITS[split]:
            if (base / folder).is_dir():
                return base / folder
    wanted = " or ".join(f"{f}/" for f in FOLDER_SPLITS[split])
    raise DatasetNotFoundError(
        f"{name} ({split} split): no {wanted} folder in " + ", ".join(str(b) for b in roots)
        + " (an image folder is ROOT/train/CLASS/*.jpg|png..., ROOT/val/ or ROOT/test/ likewise, "
        "ROOT/unlabeled/*.jpg for an unlabeled split)"
    )


def shard_for(
    name: str, split: str, root: str | Path | None, image_size: int | None = None
) -> tuple[Path, Path, tuple[str, ...] | None, int]:
    """(source split folder, shard folder, class list or None, resolution) of an image-folder
    dataset split: what ``harness data prepare`` and the loader agree on."""
    from harness.data.formats import imagenet100_classes
    from harness.data.shards import default_shard_dir

    source = _split_folder(name, split, root)
    classes = imagenet100_classes() if name == "imagenet100" and split != "unlabeled" else None
    resolution = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    return source, default_shard_dir(source, resolution, tag=name), classes, resolution


def prepare_command(name: str, split: str, root: str | Path | None, image_size: int | None) -> str:
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    where = f" --root {root}" if root is not None else ""
    return f"harness data prepare {name}{where} --split {split} --image-size {size}"


def _load_folder(
    name: str,
    split: str,
    root: str | Path | None,
    image_size: int | None,
    on_bad_image: str,
    workers: int | None,
) -> ImageDataset:
    from harness.data.shards import ensure_shard

    source, shard, classes, resolution = shard_for(name, split, root, image_size)
    images, labels, meta = ensure_shard(
        source, shard, resolution=resolution, classes=classes, on_bad_image=on_bad_image,
        workers=workers, command=prepare_command(name, split, root, image_size),
    )
    if split == "train":
        mean, std, class_names = meta.mean, meta.std, meta.class_names
    else:  # every split is normalized with the train split's statistics, as the built-in datasets
        train = _load_folder(name, "train", root, image_size, on_bad_image, workers)
        mean, std, class_names = train.mean, train.std, meta.class_names or train.class_names
        if meta.channels != train.channels:
            raise ValueError(
                f"{name}: the {split} split has {meta.channels}-channel images and the train split "
                f"{train.channels}-channel ones; convert one of them"
            )
    num_classes = len(class_names)
    return ImageDataset(
        torch.from_numpy(images), torch.from_numpy(labels), num_classes, name, split, mean, std,
        class_names, mapped=True, source=meta,
    )


def _folder_loader(name: str) -> DatasetLoader:
    def load(
        split: str,
        *,
        root: str | Path | None = None,
        download: bool = False,
        image_size: int | None = None,
        on_bad_image: str = "skip",
        workers: int | None = None,
    ) -> ImageDataset:
        if download:
            raise ValueError(f"{name} cannot be downloaded; point data_root at your copy")
        return _load_folder(name, split, root, image_size, on_bad_image, workers)

    load.__doc__ = f"Load {name} from an image folder through a prepared shard (see harness.data.shards)."
    load.__name__ = f"_load_{name}"
    return load


# ----------------------------------------------------------------------------------------------
# Synthetic and scikit-learn digits


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.to(torch.float64) / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def _template(k: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Shape template ``k`` (0..9) evaluated on coordinates ``u, v`` in about [-1, 1]; bool mask."""
    r = torch.sqrt(u * u + v * v)
    box = (u.abs() < 0.7) & (v.abs() < 0.7)
    pi = torch.pi
    if k == 0:  # disk
        return r < 0.5
    if k == 1:  # ring
        return (r - 0.55).abs() < 0.13
    if k == 2:  # horizontal bars
        return box & (torch.cos(v * 3 * pi) > 0.2)
    if k == 3:  # vertical bars
        return box & (torch.cos(u * 3 * pi) > 0.2)
    if k == 4:  # plus
        return ((u.abs() < 0.16) & (v.abs() < 0.7)) | ((v.abs() < 0.16) & (u.abs() < 0.7))
    if k == 5:  # X
        return ((u.abs() - v.abs()).abs() < 0.16) & box
    if k == 6:  # square outline
        m = torch.maximum(u.abs(), v.abs())
        return (m > 0.45) & (m < 0.68)
    if k == 7:  # triangle
        return (v > -0.5) & (v < 0.6) & (u.abs() < (v + 0.5) * 0.6)
    if k == 8:  # checkerboard
        return box & (torch.sin(u * 2.2 * pi) * torch.sin(v * 2.2 * pi) > 0)
    return box & (torch.sin((u + v) * 2.5 * pi) > 0.3)  # diagonal stripes


def _generate_synthetic(
    n: int, seed: int, channels: int, image_size: int, num_classes: int, noise: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-structured images: a per-class template, randomly shifted/scaled/rotated, plus noise."""
    g = torch.Generator().manual_seed(seed)
    # Cyclic labels: every prefix of a split is class-balanced to within one image.
    labels = torch.arange(n) % num_classes
    coords = (torch.arange(image_size, dtype=torch.float32) * 2 + 1) / image_size - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * 0.25
    scale = 0.8 + 0.4 * torch.rand(n, 1, 1, generator=g)
    angle = (torch.rand(n, 1, 1, generator=g) * 2 - 1) * (torch.pi / 12)
    x = xx - shift[:, 0, None, None]
    y = yy - shift[:, 1, None, None]
    u = (torch.cos(angle) * x + torch.sin(angle) * y) / scale
    v = (-torch.sin(angle) * x + torch.cos(angle) * y) / scale
    mask = torch.zeros(n, image_size, image_size)
    for k in range(num_classes):  # one vectorized evaluation per class, not per image
        rows = labels == k
        mask[rows] = _template(k, u[rows], v[rows]).float()
    # Colour is random per image (not per class) so that shape, not colour, identifies the class.
    foreground = 0.55 + 0.45 * torch.rand(n, channels, 1, 1, generator=g)
    background = 0.15 * torch.rand(n, channels, 1, 1, generator=g)
    img = background + mask[:, None] * (foreground - background)
    img = img + noise * torch.randn(n, channels, image_size, image_size, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels.to(torch.int64)


# Synthetic splits are generated in chunks with their own seeds, so that a split of n images is the
# prefix of a larger one, and the normalization statistics need only the first chunk.
_SYNTHETIC_CHUNK = 1000


@dataclass(frozen=True)
class _SyntheticOptions:
    channels: int
    image_size: int
    num_classes: int
    noise: float
    data_seed: int


def _synthetic_chunk(split: str, index: int, opts: _SyntheticOptions) -> tuple[torch.Tensor, torch.Tensor]:
    cache_key = ("synthetic-chunk", split, index, opts)
    with _MEMORY_LOCK:
        hit = _MEMORY_CACHE.get(cache_key)
    if hit is None:
        seed = (opts.data_seed * 2 + (split == "test")) * 100_003 + index
        hit = _generate_synthetic(_SYNTHETIC_CHUNK, seed, opts.channels, opts.image_size, opts.num_classes, opts.noise)
        with _MEMORY_LOCK:
            _MEMORY_CACHE[cache_key] = hit
    return hit


def _synthetic_split(split: str, n: int, opts: _SyntheticOptions) -> tuple[torch.Tensor, torch.Tensor]:
    chunks = [_synthetic_chunk(split, i, opts) for i in range(-(-n // _SYNTHETIC_CHUNK))]
    images = torch.cat([c[0] for c in chunks])[:n]
    labels = torch.cat([c[1] for c in chunks])[:n]
    return images, labels


def _load_synthetic(
    split: str,
    *,
    root: str | Path | None = None,
    download: bool = False,
    channels: int = 1,
    image_size: int = 28,
    num_train: int = 10000,
    num_test: int = 2000,
    num_classes: int = 10,
    noise: float = 0.08,
    data_seed: int = 0,
) -> ImageDataset:
    """Generated, class-structured images; deterministic given the options (``data_seed``, not the
    subset ``seed``, fixes the pixels, so trials with different seeds see the same data)."""
    if channels not in (1, 3):
        raise ValueError(f"synthetic: channels must be 1 or 3, got {channels}")
    if not 1 <= num_classes <= 10:
        raise ValueError(f"synthetic: num_classes must be in [1, 10], got {num_classes}")
    if image_size < 4 or num_train < 1 or num_test < 1:
        raise ValueError(
            f"synthetic: need image_size >= 4 and positive split sizes, got image_size={image_size}, "
            f"num_train={num_train}, num_test={num_test}"
        )
    opts = _SyntheticOptions(channels, image_size, num_classes, float(noise), int(data_seed))
    images, labels = _synthetic_split(split, num_train if split == "train" else num_test, opts)
    # Statistics of the first training chunk: the same for every num_train, cheap for the test split.
    mean, std = _channel_stats(_synthetic_chunk("train", 0, opts)[0])
    names = ("disk", "ring", "h-bars", "v-bars", "plus", "cross", "square", "triangle", "checker", "diagonal")
    return ImageDataset(images, labels, num_classes, "synthetic", split, mean, std, names[:num_classes])


DIGITS_TEST_FRACTION = 0.2


def _digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    with _MEMORY_LOCK:
        hit = _MEMORY_CACHE.get(("digits", split))
    if hit is not None:
        return hit
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    # Stratified split, fixed once and for all (seed 0), independent of the subset seed.
    g = torch.Generator().manual_seed(0)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        members = torch.nonzero(labels == c, as_tuple=True)[0]
        members = members[torch.randperm(len(members), generator=g)]
        test_mask[members[: round(DIGITS_TEST_FRACTION * len(members))]] = True
    splits = {
        "train": (images[~test_mask].contiguous(), labels[~test_mask].contiguous()),
        "test": (images[test_mask].contiguous(), labels[test_mask].contiguous()),
    }
    with _MEMORY_LOCK:
        for name, value in splits.items():
            _MEMORY_CACHE[("digits", name)] = value
    return splits[split]


def _load_digits(split: str, *, root: str | Path | None = None, download: bool = False) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits upscaled (bilinear) to 28x28; 80/20 stratified split."""
    images, labels = _digits_split(split)
    mean, std = _channel_stats(_digits_split("train")[0])
    return ImageDataset(images, labels, 10, "digits", split, mean, std, tuple(str(d) for d in range(10)))


DATASETS: dict[str, DatasetLoader] = {
    "fashion-mnist": _load_fashion_mnist,
    "mnist": _load_mnist,
    "cifar10": _native_loader("cifar10"),
    "cifar100": _native_loader("cifar100"),
    "stl10": _native_loader("stl10"),
    "imagefolder": _folder_loader("imagefolder"),
    "imagenet100": _folder_loader("imagenet100"),
    "synthetic": _load_synthetic,
    "digits": _load_digits,
}


def load_dataset(
    name: str,
    split: str = "train",
    *,
    root: str | Path | None = None,
    size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    download: bool = False,
    **options: Any,
) -> ImageDataset:
    """Load one split of a registered dataset as uint8 ``(N, C, H, W)`` on ``device``.

    Args:
        name: a key of :data:`DATASETS`.
        split: ``"train"`` or ``"test"``.
        root: folder to search first (the raw files, or a torchvision-style root).
            ``$HARNESS_DATA_ROOT`` is searched next, then system locations.
        size: take a deterministic class-balanced subset of this many images.
        device: where the tensors live.
        seed: selects the subset (only used with ``size``).
        download: let torchvision download a missing dataset into ``root`` (never by default).
        **options: loader-specific options, e.g. ``channels``, ``image_size``, ``num_train`` for
            ``synthetic``.

    Raises:
        ValueError: unknown name or split, or ``size`` larger than the split.
        DatasetNotFoundError: the files are missing (the message lists where it looked).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for dataset {name!r}; expected one of {', '.join(SPLITS)}")
    loader = DATASETS[name]
    kwargs: dict[str, Any] = dict(options)
    if download:
        kwargs["download"] = True
    dataset = loader(split, root=root, **kwargs)
    if size is not None and size != len(dataset):
        dataset = dataset.subset(size, seed=seed)
    return dataset.to(device)
