"""Prepared shards: an image folder decoded once into a memory-mappable uint8 array.

A shard is a folder::

    images.u8    uint8 (N, C, R, R), raw, row-major (np.memmap / torch.from_numpy, zero copy)
    labels.i64   int64 (N,), -1 for an unlabeled split
    meta.json    format, source folder and fingerprint, N, C, R, class names and counts, mean/std,
                 skipped files with reasons, converted modes; written last: its presence = complete
    progress.json  only while preparing: the chunks already written (resume after an interruption)

:func:`prepare_shard` decodes in parallel worker processes (each writes its chunk of rows straight
into the memory map), saves its progress after every chunk, and resumes where it stopped when the
source and parameters are unchanged. :func:`open_shard` maps a shard and, given the source, refuses
a stale one (:class:`StaleShardError`): the fingerprint is the sorted list of relative paths with
their sizes and modification times, so any added, removed or rewritten image is noticed.
:func:`ensure_shard` is what a trial uses: prepare if missing or stale, under a file lock so that
parallel workers prepare once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.data.formats import (
    DataFormatError,
    FolderListing,
    decode_image,
    image_mode,
    is_grayscale_mode,
    list_image_folder,
)
from harness.spec import BAD_IMAGE_POLICIES

__all__ = [
    "BAD_IMAGE_POLICIES",
    "SHARD_FORMAT",
    "ShardError",
    "ShardMeta",
    "StaleShardError",
    "default_shard_dir",
    "ensure_shard",
    "folder_fingerprint",
    "open_shard",
    "prepare_shard",
    "read_meta",
]

SHARD_FORMAT = 1
CHUNK = 256
# Images sampled (evenly spaced) for the per-channel mean/std stored in the meta.
_STATS_SAMPLE = 10_000


class ShardError(ValueError):
    """A shard is missing, incomplete or malformed; the message names the folder and the fix."""


class StaleShardError(ShardError):
    """The shard was prepared from a different version of its source folder."""


@dataclass(frozen=True)
class ShardMeta:
    source: str
    fingerprint: str
    count: int
    channels: int
    resolution: int
    class_names: tuple[str, ...]
    class_counts: dict[str, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    """(relative path, reason) of every image left out as unreadable."""
    converted: dict[str, int] = field(default_factory=dict)
    """Original PIL mode -> number of images converted from it to the shard's RGB/L."""
    format: int = SHARD_FORMAT

    @property
    def labeled(self) -> bool:
        return bool(self.class_names)

    def describe(self) -> str:
        classes = f"{len(self.class_names)} classes" if self.labeled else "unlabeled"
        notes = [f"{n} skipped" for n in [len(self.skipped)] if n]
        notes += [f"{n} converted from {m}" for m, n in sorted(self.converted.items())]
        extra = f" ({'; '.join(notes)})" if notes else ""
        return f"{self.count} images {self.channels}x{self.resolution}x{self.resolution}, {classes}{extra}"


def default_shard_dir(source: str | Path, resolution: int, *, tag: str = "") -> Path:
    """Where the trial runner keeps the shard of ``source`` at ``resolution``: under the dataset
    cache (``$HARNESS_CACHE_DIR/datasets/shards``), named by the folder and a hash of its
    resolved path (and ``tag``, e.g. a class list), so two copies never share a shard."""
    from harness.data.datasets import cache_dir

    resolved = Path(source).expanduser().resolve()
    digest = hashlib.sha256(f"{resolved}|{tag}".encode()).hexdigest()[:10]
    parent = resolved.parent.name or "root"
    return cache_dir() / "shards" / f"{parent}-{resolved.name}-{digest}" / f"{resolution}px"


def folder_fingerprint(listing: FolderListing) -> str:
    """Hash of the class names and every file's relative path, size and modification time."""
    digest = hashlib.sha256(json.dumps([SHARD_FORMAT, listing.class_names]).encode())
    for rel in listing.files:
        stat = (listing.root / rel).stat()
        digest.update(f"\0{rel}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def read_meta(path: str | Path) -> ShardMeta | None:
    """The meta of a complete shard at ``path``, or None when there is none (or it is unreadable)."""
    meta_path = Path(path) / "meta.json"
    try:
        raw = json.loads(meta_path.read_text())
        raw["class_names"] = tuple(raw["class_names"])
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        raw["skipped"] = tuple(tuple(s) for s in raw.get("skipped", ()))
        meta = ShardMeta(**raw)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if meta.format == SHARD_FORMAT else None


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Workers (module-level functions: picklable for the process pool)


def _scan_modes(task: tuple[Path, Sequence[str]]) -> list[str | None]:
    root, files = task
    modes: list[str | None] = []
    for rel in files:
        try:
            modes.append(image_mode(root / rel))
        except Exception:  # decided (and reported) when the image is decoded
            modes.append(None)
    return modes


def _decode_chunk(
    task: tuple[int, Path, tuple[int, int, int, int], Path, Sequence[str], int, str],
) -> tuple[int, list[tuple[int, str]], dict[str, int]]:
    chunk, images_path, shape, root, files, start, policy = task
    count, channels, resolution, _ = shape
    out = np.memmap(images_path, dtype=np.uint8, mode="r+", shape=(count, channels, resolution, resolution))
    failures: list[tuple[int, str]] = []
    converted: Counter[str] = Counter()
    for offset, rel in enumerate(files):
        index = start + offset
        try:
            array, mode = decode_image(root / rel, resolution, channels)
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            if policy == "error":
                raise DataFormatError(
                    f"unreadable image {root / rel}: {reason} (on_bad_image=skip leaves such files out)"
                ) from None
            failures.append((index, reason))
            continue
        out[index] = array
        if mode not in ("RGB" if channels == 3 else "L",):
            converted[mode] += 1
    out.flush()
    del out
    return chunk, failures, dict(converted)


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[Any]:
    """A process pool (fork on Linux: the workers use PIL and numpy only), or in-process map."""
    if workers <= 1:
        yield None
        return
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method)) as pool:
        yield pool


def _map(pool: Any, function: Any, tasks: list[Any]) -> Iterator[Any]:
    if pool is None:
        return map(function, tasks)
    from concurrent.futures import as_completed

    futures = [pool.submit(function, t) for t in tasks]
    return (f.result() for f in as_completed(futures))


def _progress_bar(total: int, desc: str, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=None if enabled is None else not enabled, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Prepare


def prepare_shard(
    source: str | Path,
    out: str | Path,
    *,
    resolution: int,
    classes: Sequence[str] | None = None,
    channels: int | None = None,
    workers: int | None = None,
    on_bad_image: str = "skip",
    progress: bool | None = None,
) -> ShardMeta:
    """Decode the split folder ``source`` into a shard at ``out`` (see the module docstring).

    Args:
        resolution: side R of the square images (shorter side resized to R, centre crop).
        classes: keep only these class folders, in this order (e.g. ImageNet-100's list).
        channels: 1 or 3; None = 1 when every image is grayscale, else 3 (RGB).
        workers: decoding processes (default: the CPU count, at most 8).
        on_bad_image: ``skip`` (leave unreadable images out, listed in the meta and counted) or
            ``error`` (stop at the first, naming it).
        progress: show a progress bar (None: when stderr is a terminal).

    Returns the meta; an up-to-date shard is returned as is, an interrupted one is resumed.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 4:
        raise ValueError(f"resolution must be an int >= 4, got {resolution!r}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None (automatic), got {channels!r}")
    workers = min(8, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    out = Path(out)
    listing = list_image_folder(source, classes=classes)
    fingerprint = folder_fingerprint(listing)
    existing = read_meta(out)
    if (
        existing is not None
        and existing.fingerprint == fingerprint
        and existing.resolution == resolution
        and channels in (None, existing.channels)
    ):
        return existing
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # from here on the shard is incomplete
    count = len(listing.files)
    params = {"fingerprint": fingerprint, "resolution": resolution, "count": count, "requested_channels": channels}
    state_path = out / "progress.json"
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(state_path.read_text())
    images_path = out / "images.u8"
    with _pool(workers) as pool:
        if not (state.get("params") == params and images_path.is_file()):
            state = {"params": params, "done": [], "failures": [], "converted": {}}
            state["channels"] = channels or _auto_channels(listing, pool, workers)
            with open(images_path, "wb") as handle:  # sparse: no pages are written until decoded
                handle.truncate(count * state["channels"] * resolution * resolution)
            _write_json(state_path, state)
        c = int(state["channels"])
        done = set(state["done"])
        tasks = [
            (k, images_path, (count, c, resolution, resolution), listing.root,
             listing.files[k * CHUNK : (k + 1) * CHUNK], k * CHUNK, on_bad_image)
            for k in range(-(-count // CHUNK))
            if k not in done
        ]
        bar = _progress_bar(count, f"prepare {listing.root.name} at {resolution}px", progress)
        bar.update(min(count, len(done) * CHUNK))
        converted = Counter(state["converted"])
        for chunk, failures, modes in _map(pool, _decode_chunk, tasks):
            state["done"].append(chunk)
            state["failures"].extend(failures)
            converted.update(modes)
            state["converted"] = dict(converted)
            _write_json(state_path, state)
            bar.update(len(listing.files[chunk * CHUNK : (chunk + 1) * CHUNK]))
        bar.close()
    return _finish(out, listing, state, fingerprint, resolution)


def _auto_channels(listing: FolderListing, pool: Any, workers: int) -> int:
    step = -(-len(listing.files) // (4 * workers)) or 1
    tasks = [(listing.root, listing.files[i : i + step]) for i in range(0, len(listing.files), step)]
    for modes in _map(pool, _scan_modes, tasks):
        if any(m is not None and not is_grayscale_mode(m) for m in modes):
            return 3
    return 1


def _finish(out: Path, listing: FolderListing, state: dict[str, Any], fingerprint: str, resolution: int) -> ShardMeta:
    count, channels = len(listing.files), int(state["channels"])
    failed = {int(i): reason for i, reason in state["failures"]}
    keep = np.asarray([i for i in range(count) if i not in failed], dtype=np.int64)
    if keep.size == 0:
        raise ShardError(f"{listing.root}: none of the {count} images could be read, e.g. {next(iter(failed.values()))}")
    images_path = out / "images.u8"
    row = channels * resolution * resolution
    if failed:
        # Close the gaps in place: rows only move towards the start, in order, so nothing is overwritten early.
        images = np.memmap(images_path, dtype=np.uint8, mode="r+", shape=(count, row))
        for target, source_row in enumerate(keep.tolist()):
            if target != source_row:
                images[target] = images[source_row]
        images.flush()
        del images
        with open(images_path, "r+b") as handle:
            handle.truncate(keep.size * row)
        warnings.warn(
            f"{listing.root}: {len(failed)} unreadable image(s) skipped, e.g. "
            f"{listing.files[min(failed)]}: {failed[min(failed)]} (listed in {out / 'meta.json'})",
            stacklevel=3,
        )
    labels = listing.labels[keep]
    labels.tofile(out / "labels.i64")
    mapped = np.memmap(images_path, dtype=np.uint8, mode="r", shape=(keep.size, channels, resolution, resolution))
    sample = mapped[np.linspace(0, keep.size - 1, min(keep.size, _STATS_SAMPLE)).astype(np.int64)]
    values = sample.astype(np.float64) / 255.0
    mean = tuple(round(float(v), 6) for v in values.mean(axis=(0, 2, 3)))
    std = tuple(round(max(float(v), 1e-3), 6) for v in values.std(axis=(0, 2, 3)))
    del mapped
    counts = np.bincount(labels[labels >= 0], minlength=len(listing.class_names))
    meta = ShardMeta(
        source=str(listing.root.resolve()),
        fingerprint=fingerprint,
        count=int(keep.size),
        channels=channels,
        resolution=resolution,
        class_names=listing.class_names,
        class_counts={n: int(c) for n, c in zip(listing.class_names, counts)},
        mean=mean,
        std=std,
        skipped=tuple((listing.files[i], failed[i]) for i in sorted(failed)),
        converted=dict(sorted(state["converted"].items())),
    )
    _write_json(out / "meta.json", asdict(meta))
    (out / "progress.json").unlink(missing_ok=True)
    return meta


# ----------------------------------------------------------------------------------------------
# Open


def open_shard(path: str | Path, *, source: str | Path | None = None, classes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, ShardMeta]:
    """Memory-map a complete shard: ``(images uint8 (N, C, R, R), labels int64 (N,), meta)``.

    The image array is a copy-on-write map: nothing is read until indexed, and writes (none are
    made) would never reach the file. With ``source`` the folder is listed again and a changed
    fingerprint raises :class:`StaleShardError`."""
    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        state = "interrupted (progress.json present)" if (path / "progress.json").is_file() else "missing"
        raise ShardError(
            f"no complete shard at {path} ({state}); prepare it with `harness data prepare`"
        )
    if source is not None:
        current = folder_fingerprint(list_image_folder(source, classes=classes))
        if current != meta.fingerprint:
            raise StaleShardError(
                f"shard {path} was prepared from a different version of {source} (files added, removed "
                "or modified since); prepare it again with `harness data prepare`"
            )
    shape = (meta.count, meta.channels, meta.resolution, meta.resolution)
    images_path = path / "images.u8"
    expected = int(np.prod(shape))
    if not images_path.is_file() or images_path.stat().st_size != expected:
        raise ShardError(f"{images_path}: expected {expected} bytes for {shape}; prepare the shard again")
    images = np.memmap(images_path, dtype=np.uint8, mode="c", shape=shape)
    labels = np.fromfile(path / "labels.i64", dtype=np.int64)
    if labels.shape != (meta.count,):
        raise ShardError(f"{path / 'labels.i64'}: {labels.shape[0]} labels for {meta.count} images; prepare again")
    return images, labels, meta


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (fcntl; no-op where unavailable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: parallel workers may prepare twice, never read half a shard
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_shard(
    source: str | Path,
    out: str | Path,
    *,
    resolution: int,
    classes: Sequence[str] | None = None,
    on_bad_image: str = "skip",
    workers: int | None = None,
    command: str = "",
) -> tuple[np.ndarray, np.ndarray, ShardMeta]:
    """``open_shard`` of an up-to-date shard, preparing (or re-preparing a stale or interrupted)
    one first; one process prepares while others wait on a lock. ``command`` is the equivalent
    ``harness data prepare`` line, printed when preparing."""
    out = Path(out)
    with _locked(out.parent / f".{out.name}.lock"):
        meta = read_meta(out)
        listing = list_image_folder(source, classes=classes)
        if meta is None or meta.fingerprint != folder_fingerprint(listing) or meta.resolution != resolution:
            why = "missing" if meta is None else "stale: its source changed"
            print(f"shard {out} {why}; preparing it now ({command or 'harness data prepare'})", file=sys.stderr)
            prepare_shard(source, out, resolution=resolution, classes=classes, on_bad_image=on_bad_image, workers=workers)
        return open_shard(out)
