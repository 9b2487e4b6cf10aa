"""Readers of the datasets' own on-disk formats, without torchvision's download/checksum layer.

- CIFAR-10/100: the Python pickle batches of ``cifar-10-batches-py/`` (``data_batch_1..5``,
  ``test_batch``, ``batches.meta``) and ``cifar-100-python/`` (``train``, ``test``, ``meta``).
- STL-10: the binary files of ``stl10_binary/`` (``{train,test}_X.bin``, ``{train,test}_y.bin``,
  ``unlabeled_X.bin``, ``class_names.txt``); images are read through a memory map, so the 2.7 GB
  unlabeled split costs no RAM until batches are gathered from it.
- Image folders: a torchvision ``ImageFolder`` tree (``SPLIT/CLASS/*.png|jpg|...``), or a folder
  of images without class folders (an unlabeled split). Listing here; decoding one image to a fixed
  resolution (shorter side resized, centre crop) is :func:`decode_image`.

Every function returns numpy arrays (uint8 ``(N, C, H, W)``, int64 labels, ``-1`` = no label) and
names the file and what was expected when a file is malformed. The module itself uses numpy and
PIL only (the preparation workers call nothing else), though importing it loads the package's torch.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IMAGENET100_CLASSES_FILE",
    "IMAGE_EXTENSIONS",
    "NO_LABEL",
    "DataFormatError",
    "FolderListing",
    "decode_image",
    "imagenet100_classes",
    "list_image_folder",
    "read_cifar",
    "read_stl10",
]

# torchvision's IMG_EXTENSIONS, compared case-insensitively.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
NO_LABEL = -1
IMAGENET100_CLASSES_FILE = Path(__file__).with_name("imagenet100.txt")
STL10_SIDE = 96
_STL10_IMAGE_BYTES = 3 * STL10_SIDE * STL10_SIDE


class DataFormatError(ValueError):
    """A dataset file or folder does not have the expected layout; the message names it."""


# ----------------------------------------------------------------------------------------------
# CIFAR


def _unpickle(path: Path) -> dict[str, Any]:
    """One CIFAR pickle (written by Python 2: byte-string keys) as a dict with str keys."""
    try:
        with open(path, "rb") as handle:
            raw = pickle.load(handle, encoding="bytes")
    except FileNotFoundError:
        raise
    except Exception as error:
        raise DataFormatError(f"{path}: not a CIFAR pickle batch ({type(error).__name__}: {error})") from error
    if not isinstance(raw, dict):
        raise DataFormatError(f"{path}: expected a pickled dict, found {type(raw).__name__}")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def _names(values: Sequence[Any]) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in values)


def read_cifar(folder: str | Path, split: str, *, hundred: bool) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Images ``(N, 3, 32, 32)`` uint8, labels int64 and class names of one CIFAR split.

    ``folder`` is ``cifar-10-batches-py/`` (``hundred=False``) or ``cifar-100-python/`` (fine
    labels). Raises FileNotFoundError for a missing batch and :class:`DataFormatError` for a
    malformed one."""
    folder = Path(folder)
    if hundred:
        files = ["train"] if split == "train" else ["test"]
        label_key, meta_file, names_key = "fine_labels", "meta", "fine_label_names"
    else:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, meta_file, names_key = "labels", "batches.meta", "label_names"
    images, labels = [], []
    for name in files:
        path = folder / name
        batch = _unpickle(path)
        if "data" not in batch or label_key not in batch:
            raise DataFormatError(f"{path}: expected keys 'data' and {label_key!r}, found {sorted(batch)}")
        data = np.asarray(batch["data"])
        batch_labels = np.asarray(batch[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(batch_labels) != len(data):
            raise DataFormatError(
                f"{path}: expected 'data' uint8 (N, 3072) and N labels, found {data.dtype} {data.shape} "
                f"and {len(batch_labels)} labels"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    meta = _unpickle(folder / meta_file)
    class_names = _names(meta.get(names_key, ()))
    all_labels = np.concatenate(labels)
    bound = len(class_names) or (100 if hundred else 10)
    if all_labels.size and (all_labels.min() < 0 or all_labels.max() >= bound):
        raise DataFormatError(f"{folder}: labels must lie in [0, {bound}), found {all_labels.min()}..{all_labels.max()}")
    return np.concatenate(images), all_labels, class_names


# ----------------------------------------------------------------------------------------------
# STL-10


def read_stl10(
    folder: str | Path, split: str, *, mmap_mode: str = "r"
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Images ``(N, 3, 96, 96)`` uint8 (a read-only memory-mapped view), labels int64 in [0, 10)
    (``-1`` for ``unlabeled``) and class names of one STL-10 split from ``stl10_binary/``.
    ``mmap_mode="c"`` maps copy-on-write (writable in the process, as torch wants; the file is never written).

    The binary files store each image channel by channel in column-major order; the returned view
    transposes that without copying."""
    folder = Path(folder)
    x_path = folder / f"{split}_X.bin"
    size = x_path.stat().st_size  # FileNotFoundError names the file
    if size == 0 or size % _STL10_IMAGE_BYTES:
        raise DataFormatError(
            f"{x_path}: size {size} bytes is not a positive multiple of {_STL10_IMAGE_BYTES} (3x96x96 uint8 images)"
        )
    count = size // _STL10_IMAGE_BYTES
    raw = np.memmap(x_path, dtype=np.uint8, mode=mmap_mode, shape=(count, 3, STL10_SIDE, STL10_SIDE))
    images = raw.transpose(0, 1, 3, 2)
    if split == "unlabeled":
        labels = np.full(count, NO_LABEL, dtype=np.int64)
    else:
        y_path = folder / f"{split}_y.bin"
        labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
        if labels.shape != (count,):
            raise DataFormatError(f"{y_path}: {labels.shape[0]} labels for the {count} images of {x_path.name}")
        if count and (labels.min() < 0 or labels.max() > 9):
            raise DataFormatError(f"{y_path}: labels must be 1..10, found {labels.min() + 1}..{labels.max() + 1}")
    names_path = folder / "class_names.txt"
    names = tuple(line.strip() for line in names_path.read_text().splitlines() if line.strip()) if names_path.is_file() else ()
    return images, labels, names


# ----------------------------------------------------------------------------------------------
# Image folders


@dataclass(frozen=True)
class FolderListing:
    """The images of one split folder, in a fixed order (classes sorted, files sorted in each)."""

    root: Path
    files: tuple[str, ...]
    """Paths relative to ``root``."""
    labels: np.ndarray
    """int64 ``(N,)``; ``-1`` everywhere for a folder without class folders."""
    class_names: tuple[str, ...]

    @property
    def labeled(self) -> bool:
        return bool(self.class_names)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts)}


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _images_under(folder: Path) -> list[str]:
    """Image files below ``folder`` (recursively, as ImageFolder does), relative, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        base = Path(dirpath).relative_to(folder)
        found.extend(str(base / f) for f in sorted(filenames) if _is_image(f))
    return found


def list_image_folder(folder: str | Path, *, classes: Sequence[str] | None = None) -> FolderListing:
    """List a split folder: ``CLASS/**/*.ext`` per class folder (torchvision's ImageFolder), or,
    when it has no sub-folders, the images directly in it (unlabeled).

    ``classes`` keeps only those class folders (in the given order, which fixes the labels), e.g.
    the ImageNet-100 list; every one of them must exist.

    Raises:
        FileNotFoundError: the folder, or a listed class folder, does not exist.
        DataFormatError: a class folder without images; images beside class folders; no images.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (expected CLASS/ sub-folders of images)")
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if classes is not None:
        missing = [c for c in classes if c not in subdirs]
        if missing:
            raise FileNotFoundError(
                f"{root}: {len(missing)} of the {len(classes)} listed class folders are missing, e.g. "
                + ", ".join(missing[:5])
            )
        subdirs = list(classes)
    loose = sorted(e.name for e in os.scandir(root) if e.is_file() and _is_image(e.name))
    if not subdirs:
        if not loose:
            raise DataFormatError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) and no class folders")
        return FolderListing(root, tuple(loose), np.full(len(loose), NO_LABEL, dtype=np.int64), ())
    if loose and classes is None:
        raise DataFormatError(
            f"{root}: {len(loose)} images (e.g. {loose[0]}) lie beside the class folders; move them into "
            "a class folder, or into a folder of their own for an unlabeled split"
        )
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(subdirs):
        members = _images_under(root / name)
        if not members:
            raise DataFormatError(
                f"class folder {root / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); remove it or add images"
            )
        files.extend(str(Path(name) / m) for m in members)
        labels.extend([label] * len(members))
    return FolderListing(root, tuple(files), np.asarray(labels, dtype=np.int64), tuple(subdirs))


def imagenet100_classes() -> tuple[str, ...]:
    """The 100 WordNet ids of ImageNet-100 (CMC's ``imagenet100.txt``, also solo-learn's), in file order."""
    return tuple(line.strip() for line in IMAGENET100_CLASSES_FILE.read_text().splitlines() if line.strip())


_GRAY_MODES = frozenset({"1", "L", "I", "I;16", "F"})


def decode_image(path: str | Path, resolution: int, channels: int) -> tuple[np.ndarray, str]:
    """One image as uint8 ``(channels, resolution, resolution)`` and its original PIL mode.

    The shorter side is resized to ``resolution`` (bilinear, antialiased, as torchvision's
    ``Resize``), then the centre is cropped (``CenterCrop``). Any mode is converted: palette,
    RGBA (alpha dropped), CMYK, 16-bit ... to RGB or L. Raises whatever PIL raises for an
    unreadable file (the caller names the path)."""
    from PIL import Image

    with Image.open(path) as image:
        mode = image.mode
        image.draft("RGB" if channels == 3 else "L", (resolution, resolution))  # JPEG: decode at reduced size
        if mode.startswith("I;16"):  # 16-bit grayscale: keep the high byte (convert() would clip)
            image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8))
        target = "RGB" if channels == 3 else "L"
        image = image.convert(target) if image.mode != target else image
        width, height = image.size
        scale = resolution / min(width, height)
        new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.BILINEAR)
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
        if (new_w, new_h) != (resolution, resolution):
            image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return np.ascontiguousarray(array), mode


def is_grayscale_mode(mode: str) -> bool:
    return mode in _GRAY_MODES


def image_mode(path: str | Path) -> str:
    """PIL mode from the header alone (cheap: no pixel data is decoded)."""
    from PIL import Image

    with Image.open(path) as image:
        return str(image.mode)
