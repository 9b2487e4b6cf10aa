"""Runtime helpers shared by training, the benchmarks, the study runner and the database layer.

One home for: device resolution and synchronization, peak-memory measurement (CUDA and CPU),
turning an exception into a failure reason, and retrying with backoff. torch is imported inside
the functions that need it, so torch-free callers (``harness.db``, the study layer) can use
:func:`retry` and :func:`failure_reason`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import random
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# ----------------------------------------------------------------------------------------------
# Failure reasons and retries


def failure_reason(error: BaseException) -> str:
    """``Type: message (at file.py:line)``, the line being where it was raised: the one line a
    failed trial records (a failed trial is a result with a reason, never a crashed study)."""
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    where = f" (at {os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
    return f"{type(error).__name__}: {error}{where}"


def backoff_s(attempt: int, *, base_s: float = 0.05, cap_s: float = 2.0) -> float:
    """The wait before retry ``attempt`` (0-based): exponential, capped, with jitter (x0.5 to
    x1.5), so processes that failed together do not retry in lockstep."""
    return min(cap_s, base_s * 2**min(attempt, 60)) * (0.5 + random.random())


def retry(
    work: Callable[[], T],
    *,
    transient: Callable[[BaseException], bool],
    attempts: int | None = None,
    patience_s: float | None = None,
    base_s: float = 0.05,
    cap_s: float = 2.0,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``work`` until it returns, retrying errors that ``transient`` accepts with
    :func:`backoff_s` waits, for at most ``attempts`` calls and/or ``patience_s`` seconds (the
    first limit reached; the last error is raised). ``on_retry(error, attempt, wait_s)`` is told
    before each wait."""
    if attempts is None and patience_s is None:
        raise ValueError("retry needs attempts or patience_s (or both)")
    deadline = None if patience_s is None else time.monotonic() + patience_s
    attempt = 0
    while True:
        try:
            return work()
        except Exception as error:
            if not transient(error):
                raise
            wait = backoff_s(attempt, base_s=base_s, cap_s=cap_s)
            attempt += 1
            if attempts is not None and attempt >= attempts:
                raise
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                wait = min(wait, left)
            if on_retry is not None:
                on_retry(error, attempt, wait)
            sleep(wait)


# ----------------------------------------------------------------------------------------------
# Devices


def device_problem(name: str) -> str | None:
    """Why work cannot run on device ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) on this
    machine, or None."""
    import torch

    if name in ("auto", "cpu"):
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"{name!r} is not a device name (expected auto, cpu, cuda or cuda:N)"
    if device.type != "cuda":
        return f"{name!r} is not supported (expected auto, cpu, cuda or cuda:N)"
    if not torch.cuda.is_available():
        return f"{name!r} was asked for, but CUDA is not available on this machine"
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"{name!r} was asked for, but this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})"
    return None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything :func:`device_problem` refuses is a
    ValueError carrying its message."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), before reading a clock."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Peak memory

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL | None:
    """The C library (for glibc's ``malloc_trim`` and ``mallopt``), or None where there is none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand memory that earlier work freed back to the OS (glibc's ``malloc_trim``). Without it
    the allocator serves the next measurement from pages still resident, the resident size does
    not grow, and its peak reads ~0 (measured: byol, swav, supervised at 0.0-0.2 MiB after simclr,
    simsiam and barlow_twins in one process; 115-125 MiB with the trim)."""
    gc.collect()
    trim = getattr(libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_high_water_mark() -> bool:
    """Reset the kernel's peak resident size of this process (Linux >= 4.0); False where it can't."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return bool(_status_bytes("VmHWM")) and _status_bytes("VmRSS") is not None


@functools.lru_cache(maxsize=1)
def cpu_peak_supported() -> bool:
    """Whether this process can reset and read its peak resident size (``clear_refs``)."""
    return _reset_high_water_mark()


def _resident_bytes() -> int:
    value = _status_bytes("VmRSS")
    if value is not None:
        return value
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


class PeakMemory:
    """The peak memory of the block, in bytes (``peak``; None where it cannot be measured).

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` (the caching allocator's view
    of live tensors; exact), minus what was allocated before the block when ``above_allocated``.
    CPU: the growth of the process's resident size over its size at the start, after freed heap
    pages were handed back: on Linux the kernel's high-water mark (``VmHWM``, reset through
    ``/proc/self/clear_refs``: exact, costs nothing while the block runs); elsewhere, with
    ``sample``, a thread that reads the resident size every 5 ms (else None). Tensors above glibc's
    mmap threshold (all the large ones) are mapped and unmapped directly, so the resident size
    follows them; small allocations recycled from the heap are not seen (a lower bound).
    """

    def __init__(self, device: torch.device, *, above_allocated: bool = False, sample: bool = True) -> None:
        self.device = device
        self.peak: int | None = None
        self._above_allocated = above_allocated
        self._sample = sample
        self._before = 0
        self._high_water_mark = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            import torch

            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device) if self._above_allocated else 0
            return self
        release_freed_memory()
        self._before = _resident_bytes()
        self._high_water_mark = _reset_high_water_mark()
        if not self._high_water_mark and self._sample:
            self.peak = 0

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak or 0, _resident_bytes() - self._before)

            self._thread = threading.Thread(target=sample, name="peak-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            import torch

            synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device)) - self._before
        elif self._high_water_mark:
            self.peak = max(0, (_status_bytes("VmHWM") or 0) - self._before)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()


# ----------------------------------------------------------------------------------------------
# Output paths


def output_problem(path: Path, *, folder: bool) -> tuple[str, int] | None:
    """Why ``path`` cannot be written as a file (``folder=False``) or a folder of files, checked
    before anything is created, with the exit status (2: the path is wrong, 1: the environment
    refuses: no permission, a read-only file system); None when it looks writable."""
    path = Path(path)
    kind = "folder" if folder else "file"
    ancestor = path.absolute().parent
    while not _exists(ancestor):
        ancestor = ancestor.parent
    try:
        name_max = os.pathconf(ancestor if ancestor.is_dir() else ancestor.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            return (
                f"{path}: the name {part[:40]}... is {len(os.fsencode(part))} bytes; this file system "
                f"allows {name_max}",
                2,
            )
    if _exists(path):
        if folder and not path.is_dir():
            return f"{path} is a file; expected a folder (or a path that does not exist yet)", 2
        if not folder and path.is_dir():
            return f"{path} is a folder; expected a file name", 2
    if not ancestor.is_dir():
        return f"{path}: {ancestor} is a file, so the {kind} cannot be made under it", 2
    target = path if folder and _exists(path) else ancestor
    if not os.access(target, os.W_OK):
        return f"{path}: {target} is not writable", 1
    return None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system, a loop of links: not there
        return False


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` beside ``path``, then rename it into place: a reader never sees half a
    file, and a failure leaves nothing behind."""
    path = Path(path)
    temporary = path.with_name(f".harness-{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
