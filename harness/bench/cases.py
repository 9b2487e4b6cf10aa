"""The loss-kernel benchmark cases: which shapes, which inputs, which implementations.

One :class:`Case` is a kernel at one shape. The same cases feed ``harness bench`` and the
pytest-benchmark suite in ``tests/benchmarks``. Three shape sets per kernel:

- ``cuda``: the shapes of issue 3 (production batch sizes);
- ``cpu``: the same where the CPU manages them in seconds, smaller where the reference would take
  minutes (Barlow Twins, VICReg, DINO, uniformity);
- ``quick``: one small case per kernel, chosen so that the whole ``--quick`` run stays under a
  minute on 2 cores and the fast/reference ratio is stable enough for the CI gate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.losses import LOSSES, NT_XENT_IMPLS, sinkhorn

DIRECTIONS: tuple[str, ...] = ("forward", "forward+backward")
SHAPE_SETS: tuple[str, ...] = ("quick", "cpu", "cuda")

Params = dict[str, int]


@dataclass(frozen=True)
class Inputs:
    """Positional and keyword arguments of one call, and the tensors gradients are taken for."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grad_inputs: tuple[Tensor, ...]


Maker = Callable[[Params, torch.device, torch.dtype, torch.Generator], Inputs]


@dataclass(frozen=True)
class Kernel:
    """A benchmarked function: its implementations, how to build inputs, its shapes per set."""

    name: str
    fn: Callable[..., Tensor]
    make: Maker
    shapes: dict[str, tuple[Params, ...]]
    impls: tuple[str, ...] = ("reference", "fast")
    directions: tuple[str, ...] = DIRECTIONS
    extra_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)


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
        generator = torch.Generator().manual_seed(seed)
        return self.kernel.make(self.params, torch.device(device), dtype, generator)

    def call(self, impl: str, inputs: Inputs) -> Tensor:
        kwargs = {**inputs.kwargs, **self.kernel.extra_kwargs.get(impl, {}), "impl": impl}
        return self.kernel.fn(*inputs.args, **kwargs)


def _randn(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    # Drawn on the CPU from a seeded generator so that every device sees the same numbers.
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(True)


def _pair(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
    n, d = p.get("B", p.get("N")), p["D"]
    z1 = _leaf(_randn((n, d), device, dtype, gen))
    z2 = _leaf(_randn((n, d), device, dtype, gen))
    return Inputs((z1, z2), {}, (z1, z2))


def _nt_xent(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
    inputs = _pair(p, device, dtype, gen)
    return Inputs(inputs.args, {"temperature": 0.5}, inputs.grad_inputs)


def _infonce(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
    q = _leaf(_randn((p["N"], p["D"]), device, dtype, gen))
    # MoCo detaches the keys and the queue is a buffer: gradients reach the queries only.
    k = _randn((p["N"], p["D"]), device, dtype, gen)
    queue = F.normalize(_randn((p["K"], p["D"]), device, torch.float32, gen), dim=1).to(dtype)
    return Inputs((q, k, queue), {"temperature": 0.07}, (q,))


def _byol(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
    pred = _leaf(_randn((p["N"], p["D"]), device, dtype, gen))
    target = _randn((p["N"], p["D"]), device, dtype, gen)  # the target branch is detached
    return Inputs((pred, target), {}, (pred,))


def _scores(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    # Cosine scores against unit prototypes, as SwAV computes them (values in [-1, 1]).
    z = F.normalize(_randn((p["N"], 128), device, torch.float32, gen), dim=1)
    prototypes = F.normalize(_randn((p["K"], 128), device, torch.float32, gen), dim=1)
    return (z @ prototypes.T).to(dtype)


def _swav(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
    s1 = _leaf(_scores(p, device, dtype, gen))
    s2 = _leaf(_scores(p, device, dtype, gen))
    return Inputs((s1, s2), {}, (s1, s2))


def _sinkhorn(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
    return Inputs((_scores(p, device, dtype, gen),), {"epsilon": 0.05, "iterations": 3}, ())


def _dino(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
    student = _leaf(_randn((p["N"], p["K"]), device, dtype, gen))
    teacher = _randn((p["N"], p["K"]), device, dtype, gen)
    center = torch.zeros(p["K"], device=device, dtype=dtype)
    return Inputs((student, teacher, center), {}, (student,))


def _supcon(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
    z = _leaf(_randn((p["N"], p["V"], p["D"]), device, dtype, gen))
    labels = torch.randint(0, p["C"], (p["N"],), generator=gen).to(device)
    return Inputs((z, labels), {}, (z,))


def _triplet(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
    tensors = tuple(_leaf(_randn((p["N"], p["D"]), device, dtype, gen)) for _ in range(3))
    return Inputs(tensors, {}, tensors)


def _single(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> Inputs:
    z = _leaf(_randn((p["N"], p["D"]), device, dtype, gen))
    return Inputs((z,), {}, (z,))


def _shapes(quick: list[Params], cpu: list[Params], cuda: list[Params]) -> dict[str, tuple[Params, ...]]:
    return {"quick": tuple(quick), "cpu": tuple(cpu), "cuda": tuple(cuda)}


def _grid(**axes: list[int]) -> list[Params]:
    grid: list[Params] = [{}]
    for key, values in axes.items():
        grid = [{**point, key: value} for point in grid for value in values]
    return grid


# Barlow Twins and VICReg share their shapes: both build a (D, D) cross-correlation/covariance
# of an (N, D) batch, so the N in {256, 2048} x D in {2048, 8192} applies to both.
_CROSS_CORRELATION_SHAPES = _shapes(
    _grid(N=[128], D=[1024]),
    _grid(N=[256, 1024], D=[1024, 4096]),
    _grid(N=[256, 2048], D=[2048, 8192]),
)

KERNELS: dict[str, Kernel] = {
    kernel.name: kernel
    for kernel in (
        Kernel(
            "nt_xent",
            LOSSES["nt_xent"],
            _nt_xent,
            _shapes(
                _grid(B=[1024], D=[128]),
                _grid(B=[256, 1024, 4096], D=[128]),
                _grid(B=[256, 1024, 4096], D=[128]),
            ),
            impls=NT_XENT_IMPLS,
        ),
        Kernel(
            "infonce",
            LOSSES["infonce"],
            _infonce,
            _shapes(
                _grid(N=[256], K=[16384], D=[128]),
                _grid(N=[256], K=[4096, 65536], D=[128]),
                _grid(N=[256], K=[4096, 65536], D=[128]),
            ),
        ),
        Kernel(
            "inbatch_infonce",
            LOSSES["inbatch_infonce"],
            _nt_xent,
            _shapes(
                _grid(B=[1024], D=[256]),
                _grid(B=[256, 1024, 4096], D=[256]),
                _grid(B=[256, 1024, 4096], D=[256]),
            ),
        ),
        Kernel(
            "byol",
            LOSSES["byol"],
            _byol,
            _shapes(_grid(N=[4096], D=[256]), _grid(N=[256, 4096], D=[256]), _grid(N=[256, 4096], D=[256])),
        ),
        Kernel(
            "barlow_twins",
            LOSSES["barlow_twins"],
            _pair,
            _CROSS_CORRELATION_SHAPES,
        ),
        Kernel(
            "vicreg",
            LOSSES["vicreg"],
            _pair,
            _CROSS_CORRELATION_SHAPES,
        ),
        Kernel(
            "swav",
            LOSSES["swav"],
            _swav,
            _shapes(_grid(N=[256], K=[3000]), _grid(N=[256, 1024], K=[3000]), _grid(N=[256, 1024], K=[3000])),
        ),
        Kernel(
            "sinkhorn",
            sinkhorn,
            _sinkhorn,
            _shapes(_grid(N=[256], K=[3000]), _grid(N=[256, 4096], K=[3000]), _grid(N=[256, 4096], K=[3000])),
            directions=("forward",),
        ),
        Kernel(
            "dino",
            LOSSES["dino"],
            _dino,
            _shapes(
                _grid(N=[128], K=[8192]), _grid(N=[256], K=[4096, 65536]), _grid(N=[256, 1024], K=[65536])
            ),
        ),
        Kernel(
            "supcon",
            LOSSES["supcon"],
            _supcon,
            _shapes(
                _grid(N=[256], V=[2], D=[128], C=[10]),
                _grid(N=[256, 1024], V=[2], D=[128], C=[10]),
                _grid(N=[256, 1024, 2048], V=[2], D=[128], C=[10]),
            ),
        ),
        Kernel(
            "triplet",
            LOSSES["triplet"],
            _triplet,
            _shapes(_grid(N=[4096], D=[128]), _grid(N=[256, 4096], D=[128]), _grid(N=[256, 4096], D=[128])),
        ),
        Kernel(
            "npair",
            LOSSES["npair"],
            _pair,
            _shapes(
                _grid(N=[256], D=[128]), _grid(N=[256, 1024], D=[128]), _grid(N=[256, 1024, 4096], D=[128])
            ),
        ),
        Kernel(
            "alignment",
            LOSSES["alignment"],
            _pair,
            _shapes(_grid(N=[4096], D=[128]), _grid(N=[256, 4096], D=[128]), _grid(N=[256, 4096], D=[128])),
        ),
        Kernel(
            "uniformity",
            LOSSES["uniformity"],
            _single,
            _shapes(
                _grid(N=[128], D=[128]), _grid(N=[256, 1024], D=[128]), _grid(N=[256, 1024, 4096], D=[128])
            ),
        ),
    )
}


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
    return [Case(KERNELS[name], dict(params)) for name in names for params in KERNELS[name].shapes[shape_set]]
