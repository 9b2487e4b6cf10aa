"""pytest-benchmark suite of the loss kernels: every implementation, forward and forward+backward.

The cases are ``harness.bench.cases`` (the same as ``harness bench``), grouped per kernel. On the CPU
the quick shapes run by default so that the whole file stays well under a minute; set
``HARNESS_BENCH_FULL=1`` for the CPU shapes of ``harness bench`` (minutes). CUDA cases use the
issue's shapes, warm up first and synchronize inside the timed function; they skip without a GPU.
``test_bench_peer`` times the same losses from lightly and solo-learn (``peers.py``, the optional
``peers`` extra) on the same CPU cases, forward+backward, and skips when a library is absent.

    .venv/bin/python -m pytest tests/benchmarks/test_bench_losses.py --benchmark-only
    # one table per kernel and direction, reference and fast side by side:
    .venv/bin/python -m pytest tests/benchmarks/test_bench_losses.py --benchmark-only \
        --benchmark-group-by=group,param:direction,param:device --benchmark-sort=name
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from peers import PEERS, Peer, available, forward_backward

from harness.bench.cases import Case, select_cases
from harness.bench.runner import make_call

FULL = os.environ.get("HARNESS_BENCH_FULL", "") not in {"", "0"}
CUDA = torch.cuda.is_available()
ROUNDS = 5 if not FULL else 15


def _params() -> list[object]:
    params: list[object] = []
    for device, shape_set in (("cpu", "cpu" if FULL else "quick"), ("cuda", "cuda")):
        marks = (
            [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
            if device == "cuda"
            else []
        )
        for case in select_cases(None, shape_set):
            for direction in case.kernel.directions:
                for impl in case.kernel.impls:
                    params.append(
                        pytest.param(
                            case,
                            impl,
                            direction,
                            device,
                            id=f"{device}-{case.kernel.name}-{case.name}-{direction}-{impl}",
                            marks=marks,
                        )
                    )
    return params


@pytest.mark.parametrize(("case", "impl", "direction", "device"), _params())
def test_bench_loss(
    benchmark: pytest.FixtureRequest, case: Case, impl: str, direction: str, device: str
) -> None:
    dev = torch.device(device)
    inputs = case.inputs(dev, torch.float32)
    call = make_call(case, impl, inputs, direction)
    timed: Callable[[], object] = call
    if dev.type == "cuda":

        def timed() -> object:
            out = call()
            torch.cuda.synchronize(dev)
            return out

    benchmark.group = case.kernel.name
    benchmark.extra_info.update(
        kernel=case.kernel.name,
        impl=impl,
        case=case.name,
        direction=direction,
        threads=torch.get_num_threads(),
    )
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1, iterations=1)


def _peer_params() -> list[object]:
    params: list[object] = []
    for peer in PEERS:
        for case in select_cases([peer.kernel], "cpu" if FULL else "quick"):
            params.append(
                pytest.param(
                    case,
                    peer,
                    id=f"cpu-{case.kernel.name}-{case.name}-forward+backward-{peer.library}",
                    marks=pytest.mark.skipif(
                        not available(peer.library), reason=f"{peer.library} not installed"
                    ),
                )
            )
    return params


@pytest.mark.parametrize(("case", "peer"), _peer_params())
def test_bench_peer(benchmark: pytest.FixtureRequest, case: Case, peer: Peer) -> None:
    inputs = case.inputs(torch.device("cpu"), torch.float32)
    thunk = peer.make(inputs)
    if thunk is None:
        pytest.skip(f"{peer.library} has no {case.kernel.name} of this shape")
    benchmark.group = case.kernel.name
    benchmark.extra_info.update(
        kernel=case.kernel.name,
        impl=peer.library,
        case=case.name,
        direction="forward+backward",
        threads=torch.get_num_threads(),
    )
    benchmark.pedantic(forward_backward(thunk, inputs), rounds=ROUNDS, warmup_rounds=1, iterations=1)
