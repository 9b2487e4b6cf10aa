"""Benchmark-only: the same losses from the public libraries people import instead.

lightly (``lightly.loss``) and solo-learn (``solo.losses``), installed as the optional ``peers``
extra (``pip install --no-deps lightly solo-learn``: neither may replace torch; solo-learn's
package ``__init__`` imports pytorch_lightning, so its loss files are loaded by path, as the
plain functions they are). Never a runtime dependency: without them everything here reports the
peers as absent and the pytest-benchmark cases skip.

Each :class:`Peer` calls the library on one benchmark case's inputs (``harness.losses`` builders),
with the options that make it the same loss (solo's Barlow Twins ``scale_loss=1``, its MoCo queue
transposed), and ``to_ours`` maps its value onto ours where the libraries differ by a constant
(BYOL's ``2 - 2 cos`` against lightly's ``-cos``). The side-by-side run checks that the values agree.
The peers' own center updates (DINO) are switched off: the kernels compare the loss alone.

    PYTHONPATH=. .venv/bin/python tests/benchmarks/peers.py --threads 1
    PYTHONPATH=. python tests/benchmarks/peers.py --device cuda --shapes cuda   (a lent GPU)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from harness.bench.cases import Case, select_cases
from harness.bench.timing import paired_ratio, peak_extra_bytes, steady_allocator, time_interleaved
from harness.losses import LossInputs

LIBRARIES = ("lightly", "solo-learn")
Thunk = Callable[[], Tensor]


@cache
def available(library: str) -> bool:
    module = {"lightly": "lightly", "solo-learn": "solo"}[library]
    return importlib.util.find_spec(module) is not None


@cache
def solo_module(name: str) -> types.ModuleType:
    """``solo/losses/<name>.py`` or ``solo/utils/<name>.py`` loaded by path (not via ``solo``)."""
    spec = importlib.util.find_spec("solo")
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    path = next(p for p in (root / "losses" / f"{name}.py", root / "utils" / f"{name}.py") if p.exists())
    module_spec = importlib.util.spec_from_file_location(f"_solo_{name}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Peer:
    kernel: str
    library: str
    make: Callable[[LossInputs], Thunk | None]  # None: the case is outside what the peer supports
    to_ours: Callable[[float], float] = lambda value: value


def _lightly_swav(inputs: LossInputs) -> Thunk:
    from lightly.loss import SwaVLoss

    loss = SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    if len(inputs.args) == 2:
        s1, s2 = inputs.args
        return lambda: loss([s1, s2], [])
    (scores,) = inputs.args
    queue = inputs.kwargs.get("queue_scores")
    return lambda: loss(list(scores.unbind(0))[:2], list(scores.unbind(0))[2:], queue)


def _solo_swav(inputs: LossInputs) -> Thunk | None:
    """solo-learn's SwAV: ``SinkhornKnopp`` codes for every view passed and ``swav_loss_func`` over
    all ordered pairs, so it is the same loss for two crops only (its multi-crop gives small crops
    codes too)."""
    sinkhorn = solo_module("sinkhorn_knopp").SinkhornKnopp(num_iters=3, epsilon=0.05)
    swav_loss_func = solo_module("swav").swav_loss_func
    if len(inputs.args) == 2:
        views, queue = list(inputs.args), None
    else:
        views, queue = list(inputs.args[0].unbind(0)), inputs.kwargs.get("queue_scores")
    if len(views) != 2:
        return None

    def call() -> Tensor:
        n = views[0].shape[0]
        codes = [
            sinkhorn(view.detach() if queue is None else torch.cat([view.detach(), queue[i]]))[:n]
            for i, view in enumerate(views)
        ]
        return swav_loss_func(views, codes, 0.1)

    return call


def _lightly_dino(inputs: LossInputs) -> Thunk | None:
    from lightly.loss import DINOLoss

    student, teacher, center = inputs.args
    if student.ndim != 3:
        return None  # lightly drops same-index pairs: one (student, teacher) pair has no term
    loss = DINOLoss(
        output_dim=student.shape[-1], warmup_teacher_temp=0.04, teacher_temp=0.04, student_temp=0.1
    ).to(student.device)  # its center buffer is made on the CPU
    loss.center.copy_(center.reshape(1, 1, -1))
    loss.update_center = lambda teacher_out: None  # type: ignore[method-assign]
    return lambda: loss(list(teacher.unbind(0)), list(student.unbind(0)), teacher_temp=0.04)


def _solo_dino(inputs: LossInputs) -> Thunk | None:
    student, teacher, center = inputs.args
    if student.ndim != 3:
        return None
    loss = solo_module("dino").DINOLoss(
        num_prototypes=student.shape[-1],
        warmup_teacher_temp=0.04,
        teacher_temp=0.04,
        warmup_teacher_temp_epochs=0,
        num_epochs=1,
        student_temp=0.1,
        num_large_crops=student.shape[0],  # solo chunks the student's output into this many crops
    ).to(student.device)  # its center buffer is made on the CPU
    loss.center.copy_(center.reshape(1, -1))
    loss.update_center = lambda teacher_output: None  # type: ignore[method-assign]
    return lambda: loss(student.flatten(0, 1), teacher.flatten(0, 1))


def _lightly_nt_xent(inputs: LossInputs) -> Thunk:
    from lightly.loss import NTXentLoss

    loss = NTXentLoss(temperature=inputs.kwargs["temperature"])
    return lambda: loss(*inputs.args)


def _solo_nt_xent(inputs: LossInputs) -> Thunk:
    simclr = solo_module("simclr").simclr_loss_func
    return lambda: simclr(*inputs.args, temperature=inputs.kwargs["temperature"])


def _solo_infonce(inputs: LossInputs) -> Thunk:
    moco = solo_module("moco").moco_loss_func
    q, k, queue = inputs.args
    # solo normalizes nothing itself (its method does) and keeps the queue as (D, K).
    return lambda: moco(
        torch.nn.functional.normalize(q, dim=1),
        torch.nn.functional.normalize(k, dim=1),
        queue.T,
        inputs.kwargs["temperature"],
    )


def _lightly_barlow(inputs: LossInputs) -> Thunk:
    from lightly.loss import BarlowTwinsLoss

    loss = BarlowTwinsLoss(lambda_param=5e-3)
    return lambda: loss(*inputs.args)


def _solo_barlow(inputs: LossInputs) -> Thunk:
    barlow = solo_module("barlow").barlow_loss_func
    return lambda: barlow(*inputs.args, lamb=5e-3, scale_loss=1.0)


def _lightly_vicreg(inputs: LossInputs) -> Thunk:
    from lightly.loss import VICRegLoss

    loss = VICRegLoss()
    return lambda: loss(*inputs.args)


def _solo_vicreg(inputs: LossInputs) -> Thunk:
    vicreg = solo_module("vicreg").vicreg_loss_func
    return lambda: vicreg(*inputs.args)


def _lightly_byol(inputs: LossInputs) -> Thunk:
    from lightly.loss import NegativeCosineSimilarity

    loss = NegativeCosineSimilarity()
    p, z = inputs.args
    return lambda: loss(p, z)


def _solo_byol(inputs: LossInputs) -> Thunk:
    byol = solo_module("byol").byol_loss_func
    p, z = inputs.args
    return lambda: byol(p, z)


PEERS: tuple[Peer, ...] = (
    Peer("nt_xent", "lightly", _lightly_nt_xent),
    Peer("nt_xent", "solo-learn", _solo_nt_xent),
    Peer("infonce", "solo-learn", _solo_infonce),
    Peer("byol", "lightly", _lightly_byol, lambda value: 2 + 2 * value),  # -mean cos
    Peer("byol", "solo-learn", _solo_byol),
    Peer("barlow_twins", "lightly", _lightly_barlow),
    Peer("barlow_twins", "solo-learn", _solo_barlow),
    Peer("vicreg", "lightly", _lightly_vicreg),
    Peer("vicreg", "solo-learn", _solo_vicreg),
    Peer("swav", "lightly", _lightly_swav),
    Peer("swav", "solo-learn", _solo_swav),
    Peer("swav_multicrop", "lightly", _lightly_swav),
    Peer("swav_multicrop", "solo-learn", _solo_swav),
    Peer("dino_multicrop", "lightly", _lightly_dino),
    Peer("dino_multicrop", "solo-learn", _solo_dino),
)


def peers_for(kernel: str) -> list[Peer]:
    return [peer for peer in PEERS if peer.kernel == kernel and available(peer.library)]


def forward_backward(thunk: Thunk, inputs: LossInputs) -> Callable[[], object]:
    return lambda: torch.autograd.grad(thunk(), inputs.grad_inputs)


@dataclass(frozen=True)
class Row:
    kernel: str
    case: str
    impl: str
    median_ms: float
    peak_mib: float | None
    ratio_to_best_peer: float
    value_rel_diff: float


def side_by_side(
    case: Case, rounds: int = 7, memory: bool = True, device: torch.device | str = "cpu"
) -> list[Row]:
    """Forward+backward of ``fast`` and of every installed peer on one case, float32, interleaved,
    on ``device`` (CUDA timings synchronize the device around each call)."""
    device = torch.device(device)
    inputs = case.inputs(device, torch.float32)
    thunks: dict[str, Thunk] = {"fast": lambda: case.call("fast", inputs)}
    maps: dict[str, Callable[[float], float]] = {"fast": lambda value: value}
    for peer in peers_for(case.kernel.name):
        thunk = peer.make(inputs)
        if thunk is not None:
            thunks[peer.library] = thunk
            maps[peer.library] = peer.to_ours
    if len(thunks) == 1:
        return []
    ours = float(thunks["fast"]().detach())
    calls = {impl: forward_backward(thunk, inputs) for impl, thunk in thunks.items()}
    timings = time_interleaved(calls, device, rounds=rounds, min_round_s=0.05, warmup=1)
    peers = [impl for impl in timings if impl != "fast"]
    best = min(peers, key=lambda impl: timings[impl].median_s)
    rows = []
    for impl, timing in timings.items():
        peak = peak_extra_bytes(calls[impl], device) if memory else None
        value = maps[impl](float(thunks[impl]().detach()))
        rows.append(
            Row(
                case.kernel.name,
                case.name,
                impl,
                timing.median_s * 1e3,
                None if peak is None else peak / 2**20,
                paired_ratio(timing, timings[best]),
                abs(value - ours) / abs(ours),
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kernels", default=",".join(sorted({peer.kernel for peer in PEERS})))
    parser.add_argument("--shapes", default="cpu", choices=["quick", "cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    missing = [library for library in LIBRARIES if not available(library)]
    if missing:
        print(f"not installed (skipped): {', '.join(missing)}", file=sys.stderr)
    torch.set_num_threads(args.threads)
    steady_allocator()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads={args.threads}"
    print(f"{where}, float32, forward+backward, torch {torch.__version__}")
    print("| kernel | case | impl | median ms | peak MiB | time / best peer | value vs fast |")
    print("|---|---|---|---:|---:|---:|---:|")
    worst: list[float] = []
    for case in select_cases(args.kernels.split(","), args.shapes):
        for row in side_by_side(case, rounds=args.rounds, device=device):
            peak = "-" if row.peak_mib is None else f"{row.peak_mib:.1f}"
            print(
                f"| {row.kernel} | {row.case} | {row.impl} | {row.median_ms:.2f} | {peak} | "
                f"{row.ratio_to_best_peer:.2f} | {row.value_rel_diff:.1e} |",
                flush=True,
            )
            if row.impl == "fast":
                worst.append(row.ratio_to_best_peer)
    if worst:
        print(f"\nfast / best peer: median {statistics.median(worst):.2f}, worst {max(worst):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
