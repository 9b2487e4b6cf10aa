"""Loss-kernel microbenchmarks: cases, timing, storage in ``harness_bench``, the baseline gate.

``harness bench`` is :mod:`harness.bench.cli`; the pytest-benchmark suite in ``tests/benchmarks``
uses the same cases (:mod:`harness.bench.cases`).
"""

from __future__ import annotations

from harness.bench.cases import KERNELS, Case, kernel_names, parse_kernels, select_cases
from harness.bench.compare import Comparison, compare, format_table, parse_threshold
from harness.bench.runner import FULL, QUICK, Result, RunConfig, run_cases

__all__ = [
    "FULL",
    "KERNELS",
    "QUICK",
    "Case",
    "Comparison",
    "Result",
    "RunConfig",
    "compare",
    "format_table",
    "kernel_names",
    "parse_kernels",
    "parse_threshold",
    "run_cases",
    "select_cases",
]
