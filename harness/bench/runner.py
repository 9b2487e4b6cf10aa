"""Run benchmark cases: time every implementation of every case, measure its peak memory, and
compute its ratio to the reference measured in the same run."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import torch

from harness.bench.cases import DIRECTIONS, Case, Inputs
from harness.bench.timing import paired_ratio, peak_extra_bytes, steady_allocator, time_interleaved

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class RunConfig:
    rounds: int = 15
    min_round_s: float = 0.02
    warmup: int = 1
    measure_memory: bool = True
    directions: tuple[str, ...] = DIRECTIONS


QUICK = RunConfig(rounds=11, min_round_s=0.03)
FULL = RunConfig(rounds=15, min_round_s=0.05)


@dataclass(frozen=True)
class Result:
    """One row of ``harness_bench`` without the run's identity and provenance."""

    kernel: str
    impl: str
    case: str
    params: dict[str, Any]
    device: str
    dtype: str
    direction: str
    median_s: float
    iqr_s: float
    min_s: float
    rounds: int
    peak_mem_bytes: float | None
    ratio_to_reference: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_call(case: Case, impl: str, inputs: Inputs, direction: str) -> Callable[[], object]:
    """The timed callable. ``forward`` builds the autograd graph (as in training) and drops it;
    ``forward+backward`` also takes the gradients of the inputs that need them."""
    if direction == "forward":
        return lambda: case.call(impl, inputs)
    if direction != "forward+backward":
        raise ValueError(f"unknown direction {direction!r}")
    targets = inputs.grad_inputs

    def forward_backward() -> object:
        return torch.autograd.grad(case.call(impl, inputs), targets)

    return forward_backward


def run_case(case: Case, device: torch.device, dtype: torch.dtype, config: RunConfig) -> list[Result]:
    inputs = case.inputs(device, dtype)
    results: list[Result] = []
    for direction in config.directions:
        if direction not in case.kernel.directions or (direction != "forward" and not inputs.grad_inputs):
            continue
        calls = {impl: make_call(case, impl, inputs, direction) for impl in case.kernel.impls}
        timings = time_interleaved(
            calls, device, rounds=config.rounds, min_round_s=config.min_round_s, warmup=config.warmup
        )
        reference = timings["reference"]
        params = dict(case.params)
        if device.type == "cpu":
            params["threads"] = torch.get_num_threads()
        for impl, timing in timings.items():
            peak = peak_extra_bytes(calls[impl], device) if config.measure_memory else None
            results.append(
                Result(
                    kernel=case.kernel.name,
                    impl=impl,
                    case=case.name,
                    params=params,
                    device=device.type,
                    dtype=str(dtype).removeprefix("torch."),
                    direction=direction,
                    median_s=timing.median_s,
                    iqr_s=timing.iqr_s,
                    min_s=timing.min_s,
                    rounds=timing.rounds,
                    peak_mem_bytes=peak,
                    ratio_to_reference=1.0 if impl == "reference" else paired_ratio(timing, reference),
                )
            )
    return results


def run_cases(
    cases: list[Case],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    config: RunConfig = QUICK,
    progress: TextIO | None = sys.stderr,
) -> list[Result]:
    if device.type == "cpu":
        steady_allocator()
    results: list[Result] = []
    for index, case in enumerate(cases, start=1):
        if progress is not None:
            print(f"[{index}/{len(cases)}] {case.id} on {device.type}", file=progress, flush=True)
        results.extend(run_case(case, device, dtype, config))
    return results
