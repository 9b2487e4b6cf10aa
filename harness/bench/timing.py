"""Timing and peak-memory measurement of one callable on the CPU or a CUDA device.

Timing: a warm-up call, then the number of calls per round is calibrated so that a round lasts at
least ``min_round_s`` (short kernels are otherwise dominated by the timer), then ``rounds`` rounds.
On CUDA a round is bracketed by CUDA events and synchronized, so the time is the device's. The
implementations of a case are interleaved round by round (the order rotating), and the ratio to the
reference is the median of the per-round ratios (:func:`paired_ratio`): a slow patch of a shared
machine hits both sides of a round's ratio alike. On the CPU, glibc's allocator is first put in its
converged state (:func:`steady_allocator`) so that results do not depend on the order of the cases.

Peak memory is the extra memory one call needs on top of what was allocated before it, measured
by :class:`harness.runtime.PeakMemory` (CUDA: the caching allocator's peak, exact; Linux CPU: the
kernel's resettable high-water mark of the resident size, a lower bound accurate for the
``(N, N)``-sized temporaries that matter; elsewhere the CPU peak is not measured: None).
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from harness.runtime import PeakMemory, cpu_peak_supported, libc, synchronize

__all__ = [
    "Timing",
    "calibrate",
    "cpu_peak_supported",
    "paired_ratio",
    "peak_extra_bytes",
    "steady_allocator",
    "summarize",
    "synchronize",
    "time_calls",
    "time_interleaved",
]


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the rounds; ``samples`` in round order (for paired ratios)."""

    median_s: float
    iqr_s: float
    min_s: float
    rounds: int
    calls_per_round: int
    samples: tuple[float, ...] = ()


def summarize(per_call: Sequence[float], calls_per_round: int = 1) -> Timing:
    values = sorted(per_call)
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        iqr = q3 - q1
    else:
        iqr = 0.0
    return Timing(statistics.median(values), iqr, values[0], len(values), calls_per_round, tuple(per_call))


def paired_ratio(numerator: Timing, denominator: Timing) -> float:
    """Median over rounds of ``numerator / denominator`` measured in the same round.

    The two were timed back to back in each round (:func:`time_interleaved`), so a burst of load
    from another process that slows a round slows both sides of its ratio: the median of the
    per-round ratios is far steadier than a ratio of two medians on a shared machine.
    """
    pairs = [n / d for n, d in zip(numerator.samples, denominator.samples) if d > 0]
    if not pairs:
        return numerator.median_s / denominator.median_s
    return statistics.median(pairs)


def time_calls(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Seconds for ``calls`` back-to-back calls of ``fn`` (device time on CUDA)."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - begin


def calibrate(
    fn: Callable[[], object], device: torch.device, min_round_s: float, max_calls: int = 1000
) -> int:
    """Calls per round so that a round lasts at least ``min_round_s`` (after one warm-up call)."""
    fn()
    synchronize(device)
    calls = 1
    while True:
        elapsed = time_calls(fn, device, calls)
        if elapsed >= min_round_s or calls >= max_calls:
            return calls
        calls = min(max_calls, max(calls * 2, int(calls * min_round_s / max(elapsed, 1e-9)) + 1))


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    rounds: int,
    min_round_s: float,
    warmup: int = 1,
) -> dict[str, Timing]:
    """Time several callables round-robin; the order rotates every round to cancel drift."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    calls = {name: calibrate(fn, device, min_round_s) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(time_calls(fns[name], device, calls[name]) / calls[name])
    return {name: summarize(samples[name], calls[name]) for name in names}


# glibc's mallopt parameters; the mmap threshold its dynamic rule converges to on 64-bit Linux.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20
_TRIM_THRESHOLD = 2**30


@functools.lru_cache(maxsize=1)
def steady_allocator() -> bool:
    """Put glibc's malloc in a steady state, once per process, so ratios do not depend on history.

    glibc starts with a 128 KiB mmap threshold and raises it (up to 32 MiB) each time a larger
    mmapped block is freed, and gives the top of the heap back to the kernel whenever more than the
    trim threshold is free there. A benchmark process that runs each kernel once would otherwise
    time early kernels with page faults on every temporary and later ones without, and whether a
    call pays page faults would depend on how fragmented earlier cases left the heap: the
    fast/reference ratios depended on the order of the cases (measured: up to 5x on the quick set).
    Here the mmap threshold is fixed at its converged 32 MiB (larger tensors are mapped and unmapped
    on every call, as in any PyTorch process) and the heap is never trimmed automatically, so
    smaller temporaries are reused without page faults from the second call on, like the caching
    allocator on a GPU. Returns whether it applied (glibc only).
    """
    mallopt = getattr(libc(), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> float | None:
    """Extra memory at the peak of one call of ``fn`` (see the module docstring), or None."""
    gc.collect()
    with PeakMemory(device, above_allocated=True, sample=False) as memory:
        fn()
    return None if memory.peak is None else float(memory.peak)
