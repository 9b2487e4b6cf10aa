"""The loss-kernel benchmark cases, derived from the loss declarations.

Every kernel is a :class:`harness.losses.LossSpec` declared next to its code (its implementations,
input builder and shapes); this module only enumerates them. One :class:`Case` is a kernel at one
shape. The same cases feed ``harness bench`` and the pytest-benchmark suite in ``tests/benchmarks``.
Three shape sets per kernel:

- ``cuda``: the issues' shapes (production batch sizes);
- ``cpu``: the same where the CPU manages them in seconds, smaller where the reference would take
  minutes (Barlow Twins, VICReg, DINO, uniformity);
- ``quick``: one small case per kernel, chosen so that the whole ``--quick`` run stays near a
  minute on 2 cores and the fast/reference ratio is stable enough for the CI gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from harness.losses import LOSS_SPECS, LossInputs, LossSpec
from harness.losses.declaration import DIRECTIONS, SHAPE_SETS, Params

__all__ = [
    "DIRECTIONS",
    "KERNELS",
    "SHAPE_SETS",
    "Case",
    "Inputs",
    "Kernel",
    "kernel_names",
    "parse_kernels",
    "select_cases",
]

# The benchmark's names for the declaration's types.
Kernel = LossSpec
Inputs = LossInputs

KERNELS: dict[str, Kernel] = dict(LOSS_SPECS)


@dataclass(frozen=True)
class Case:
    kernel: Kernel
    params: Params

    @property
    def name(self) -> str:
        """``"B=4096,D=128"``: the ``case`` column of ``harness_bench``."""
        return ",".join(f"{key}={value}" for key, value in self.params.items())

    @property
    def id(self) -> str:
        return f"{self.kernel.name}[{self.name}]"

    def inputs(self, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> Inputs:
        return self.kernel.inputs(self.params, device, dtype, seed)

    def call(self, impl: str, inputs: Inputs) -> Tensor:
        return self.kernel.fn(*inputs.args, **{**inputs.kwargs, "impl": impl})


def kernel_names() -> list[str]:
    return list(KERNELS)


def parse_kernels(text: str | None) -> list[str]:
    """``"nt_xent,infonce"`` -> names, in registry order; None or ``"all"`` -> every kernel.

    Raises ValueError naming the unknown kernels and listing the known ones.
    """
    if text is None or text.strip() in {"", "all"}:
        return kernel_names()
    wanted = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in KERNELS]
    if unknown:
        raise ValueError(f"unknown kernel(s): {', '.join(unknown)}; known: {', '.join(KERNELS)}")
    return [name for name in KERNELS if name in wanted]


def select_cases(kernels: list[str] | None = None, shape_set: str = "quick") -> list[Case]:
    """The cases of the given kernels (all by default) in one shape set (quick, cpu, cuda)."""
    if shape_set not in SHAPE_SETS:
        raise ValueError(f"shape set must be one of {SHAPE_SETS}, got {shape_set!r}")
    names = kernel_names() if kernels is None else kernels
    return [
        Case(KERNELS[name], dict(params)) for name in names for params in KERNELS[name].shapes.of(shape_set)
    ]
