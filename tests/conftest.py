"""Suite-wide settings.

Unit tests run torch on one thread: their tensors are tiny, and on a 2-core machine shared with a
second process (the concurrent-runner tests start several) two OpenMP threads stall at every
parallel region whenever one is descheduled. Benchmarks (tests/benchmarks/) keep torch's default
threads, since they measure the machine as a user would run it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

BENCHMARKS = os.path.join("tests", "benchmarks")


@pytest.fixture(autouse=True)
def _one_thread_for_unit_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    if BENCHMARKS in str(request.node.path):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
