"""How a loss is declared: once, next to its code.

Each loss file ends with its :class:`LossSpec` (or several, ``SPECS``): the function and its
implementations, the builder of its inputs at a given shape, its minimum batch (which the function
itself enforces), its benchmark shapes per set, and the properties the contract tests check.
``harness.losses.LOSS_SPECS`` collects them; the benchmark cases (``harness.bench.cases``) and the
test table (``tests/test_losses.py``, which adds only its independent formulas) are derived from
it. Adding a loss is its file plus one line in ``harness/losses/__init__.py`` (docs/LOSSES.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.losses._common import IMPLS

DIRECTIONS: tuple[str, ...] = ("forward", "forward+backward")
SHAPE_SETS: tuple[str, ...] = ("quick", "cpu", "cuda")

Params = Mapping[str, int]


@dataclass(frozen=True)
class LossInputs:
    """Positional and keyword arguments of one call, and the tensors gradients are taken for
    (those that training differentiates: e.g. not MoCo's keys, not DINO's teacher)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grad_inputs: tuple[Tensor, ...]


Builder = Callable[[Params, torch.device, torch.dtype, torch.Generator], LossInputs]


@dataclass(frozen=True)
class BenchShapes:
    """Benchmark shapes per set: ``quick`` (one small case, the CI gate's), ``cpu`` (what the CPU
    manages in seconds), ``cuda`` (production sizes)."""

    quick: tuple[Params, ...]
    cpu: tuple[Params, ...]
    cuda: tuple[Params, ...]

    def of(self, shape_set: str) -> tuple[Params, ...]:
        if shape_set not in SHAPE_SETS:
            raise ValueError(f"shape set must be one of {SHAPE_SETS}, got {shape_set!r}")
        return getattr(self, shape_set)


@dataclass(frozen=True)
class LossSpec:
    """One loss (or benchmarked kernel), declared once.

    ``make(params, device, dtype, generator)`` builds the inputs at one shape; ``params`` has the
    keys of the benchmark shapes (``batch_key`` is the batch size, ``width_key`` the dimension the
    contract tests vary; ``test_params`` fixes the other keys for those tests). ``min_batch`` is
    enforced by the function (with ``min_batch_why`` in its error). ``loss=False`` marks a kernel that
    is benchmarked but is not a loss (Sinkhorn). ``symmetric``: swapping the first two arguments
    leaves the value unchanged; ``scale_invariant``: positions of arguments whose norm does not
    matter; ``temperature_kw``: the keyword arguments that are temperatures.
    """

    name: str
    fn: Callable[..., Tensor]
    make: Builder
    min_batch: int
    min_batch_why: str
    shapes: BenchShapes
    impls: tuple[str, ...] = IMPLS
    directions: tuple[str, ...] = DIRECTIONS
    batch_key: str = "N"
    width_key: str = "D"
    test_params: Mapping[str, int] = field(default_factory=dict)
    loss: bool = True
    symmetric: bool = False
    scale_invariant: tuple[int, ...] = ()
    temperature_kw: tuple[str, ...] = ()

    @property
    def fast_impls(self) -> tuple[str, ...]:
        return tuple(impl for impl in self.impls if impl != "reference")

    def inputs(
        self,
        params: Params,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> LossInputs:
        return self.make(params, torch.device(device), dtype, torch.Generator().manual_seed(seed))

    def test_params_for(self, n: int, d: int) -> dict[str, int]:
        """The shape of the contract tests' inputs: batch ``n``, width ``d``, the rest fixed."""
        return {**self.test_params, self.batch_key: n, self.width_key: d}


# ---------------------------------------------------------------------------------------------
# Builder helpers


def randn(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """Normal numbers drawn on the CPU in float64 from a seeded generator, so that every device and
    dtype sees the same values (rounded to ``dtype``)."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def unit_rows(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, gen: torch.Generator
) -> Tensor:
    return F.normalize(randn(shape, device, torch.float64, gen), dim=-1).to(dtype)


def leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(True)


def prototype_scores(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, gen: torch.Generator, dim: int = 128
) -> Tensor:
    """Cosine scores ``(..., K)`` of unit embeddings against ``K`` unit prototypes, as SwAV computes
    them (values in [-1, 1]); ``shape`` ends with ``K``."""
    *rows, k = shape
    z = unit_rows((*rows, dim), device, torch.float64, gen)
    prototypes = unit_rows((k, dim), device, torch.float64, gen)
    return (z @ prototypes.T).to(dtype)


def grid(**axes: list[int]) -> tuple[Params, ...]:
    """The cartesian product of the axes, in order: ``grid(N=[1, 2], D=[3])``."""
    points: list[dict[str, int]] = [{}]
    for key, values in axes.items():
        points = [{**point, key: value} for point in points for value in values]
    return tuple(points)


def pair_inputs(
    p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator, **kwargs: Any
) -> LossInputs:
    """Two ``(N, D)`` leaves (``N`` or ``B`` the batch), both differentiated."""
    n, d = p.get("B", p.get("N")), p["D"]
    assert n is not None
    z1 = leaf(randn((n, d), device, dtype, gen))
    z2 = leaf(randn((n, d), device, dtype, gen))
    return LossInputs((z1, z2), dict(kwargs), (z1, z2))


def single_inputs(
    p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator, **kwargs: Any
) -> LossInputs:
    z = leaf(randn((p["N"], p["D"]), device, dtype, gen))
    return LossInputs((z,), dict(kwargs), (z,))
