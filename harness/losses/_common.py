"""Validation and dtype helpers shared by the loss files (no public names here)."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

IMPLS: tuple[str, ...] = ("reference", "fast")


def check_impl(loss: str, impl: str, allowed: tuple[str, ...] = IMPLS) -> None:
    if impl not in allowed:
        raise ValueError(f"{loss}: impl must be one of {', '.join(map(repr, allowed))}, got {impl!r}")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype a loss computes in: float64 stays float64, everything else runs in float32.

    16-bit inputs (bf16, fp16) are upcast because the log-sum-exp, the standardizations and the
    Gram products lose too much in 7 or 10 mantissa bits; gradients flow back in the input dtype.
    """
    for tensor in tensors:
        if not tensor.is_floating_point():
            raise TypeError(f"expected a floating-point tensor, got {tensor.dtype}")
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def upcast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def check_matrix(loss: str, name: str, tensor: Tensor, ndim: int = 2) -> None:
    """``ndim`` dimensions, none but the first (the batch, checked by each loss) of size zero."""
    if tensor.ndim != ndim:
        raise ValueError(f"{loss}: {name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if 0 in tensor.shape[1:]:
        raise ValueError(f"{loss}: {name} has an empty feature dimension, got shape {tuple(tensor.shape)}")


def check_same_shape(loss: str, **tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"{loss}: inputs must have the same shape, got {listed}")


def check_batch(loss: str, n: int, minimum: int, why: str) -> None:
    if n < minimum:
        raise ValueError(f"{loss}: batch of {n} is too small, need at least {minimum} ({why})")


def checked_inputs(
    loss: str, impl: str, *, min_batch: int, why: str, allowed: tuple[str, ...] = IMPLS, **tensors: Tensor
) -> tuple[Tensor, ...]:
    """The argument contract most losses share: ``impl`` is known, every tensor is an ``(N, D)``
    matrix, all have one shape, and ``N >= min_batch`` (``why`` says what a smaller batch breaks).
    Returns the tensors, in the order given, in the loss's compute dtype (:func:`compute_dtype`)."""
    check_impl(loss, impl, allowed)
    for name, tensor in tensors.items():
        check_matrix(loss, name, tensor)
    check_same_shape(loss, **tensors)
    check_batch(loss, next(iter(tensors.values())).shape[0], min_batch, why)
    dtype = compute_dtype(*tensors.values())
    return tuple(upcast(tensor, dtype) for tensor in tensors.values())


def check_positive(loss: str, name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{loss}: {name} must be a positive finite number, got {value!r}")


def normalize_scaled(x: Tensor, scale: float = 1.0, eps: float = 1e-12) -> Tensor:
    """Rows of ``x`` scaled to norm ``scale`` in one pass over ``x``.

    The same as ``F.normalize(x, dim=-1) * scale`` (including the ``eps`` floor of the norm), but the
    scale is folded into the per-row divisor, so no second (rows, D) temporary is written.
    """
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)
    return x * (scale / norms)


LossFn = TypeVar("LossFn", bound=Callable[..., Tensor])


def autocast_off(fn: LossFn) -> LossFn:
    """Run a loss with autocast disabled on its inputs' device.

    The losses choose their own precision (:func:`compute_dtype`); under an enclosing autocast their
    matrix products would silently drop back to 16 bits and the custom backward passes would meet
    mixed dtypes. Costs nothing when autocast is off.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Tensor:
        first = next((a for a in args if isinstance(a, Tensor)), None)
        if first is None or not torch.is_autocast_enabled(first.device.type):
            return fn(*args, **kwargs)
        with torch.autocast(first.device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def autocast_disabled(tensor: Tensor) -> contextlib.AbstractContextManager[object]:
    """Autocast off on ``tensor``'s device, for custom backward passes: autograd runs them under the
    autocast state of the ``backward()`` call, not of the forward pass."""
    if torch.is_autocast_enabled(tensor.device.type):
        return torch.autocast(tensor.device.type, enabled=False)
    return contextlib.nullcontext()


# Elements per partial dot product of :func:`blockwise_dot`: short enough that float32 keeps about
# 1e-7 relative on each block, long enough that the Python loop costs nothing measurable (a 16M-entry
# dot took the same time in 64K blocks as in one call; docs/LOSSES.md).
DOT_BLOCK = 1 << 16


def blockwise_dot(a: Tensor, b: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """``Σ a ⊙ b`` over all entries, accurate in float32, returned in ``dtype`` (default the inputs').

    On the CPU one BLAS ``dot`` over millions of entries accumulates in a few float32 lanes and
    drifts: over the 4M entries of a 2048² Gram matrix it was 8e-5 relative off, over 67M entries
    4e-3 (docs/LOSSES.md). Here each BLAS dot covers ``DOT_BLOCK`` entries and the partial sums add
    up in float64. CUDA's dot is a tree reduction already (one call); float64 needs no blocks.
    """
    a, b = a.reshape(-1), b.reshape(-1)
    if a.numel() <= DOT_BLOCK or a.dtype == torch.float64 or a.device.type != "cpu":
        result = torch.dot(a, b)
    else:
        parts = [torch.dot(x, y) for x, y in zip(a.split(DOT_BLOCK), b.split(DOT_BLOCK))]
        result = torch.stack(parts).sum(dtype=torch.float64)
    return result.to(dtype or a.dtype)


def softmax_and_lse(s: Tensor, scale: float = 1.0, *, overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """``softmax(scale · s)`` by rows of ``(..., K)`` scores, and its row log-sum-exp ``(...)``.

    The fused softmax kernel: its vectorized exponential is faster than ``exp_`` (docs/LOSSES.md).
    On the CPU it runs in place, on a scaled copy of ``s``, or on ``s`` itself when the caller owns
    it (``overwrite``, with ``scale`` 1): the kernel reads a row for its maximum, writes
    ``exp(x - max)`` over it and rescales it, so in place is exact (tests/test_losses.py guards
    the aliasing), and no second ``(N, K)`` buffer exists. Elsewhere the out-of-place kernel. The
    log-sum-exp needs no other exponential: at the row maximum ``p = exp(0) / Σ exp(x - max)``, so
    ``lse = max - log(max p)``, and ``max p ≥ 1/K`` never underflows; ``max(scale · s) =
    scale · max(s)`` exactly (rounding is monotonic).
    """
    s = s.contiguous()  # the scaled copy then is too: the in-place kernel sees rows in order
    top = s.amax(dim=-1)  # before an in-place softmax overwrites s
    if s.device.type == "cpu":
        p = s if overwrite and scale == 1.0 else torch.mul(s, scale)
        torch.softmax(p, dim=-1, out=p)
    else:
        p = torch.softmax(s * scale, dim=-1)
    return p, top.mul_(scale).sub_(p.amax(dim=-1).log_())
