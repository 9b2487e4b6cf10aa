"""Row-wise log-sum-exp of a self-similarity matrix with its diagonal excluded, and its gradient.

Shared by the fast NT-Xent and SupCon. For ``z`` of shape ``(M, D)`` (already normalized and scaled
by ``temperature ** -0.5`` so that ``S = z zᵀ`` are the logits) it returns ``lse`` of shape ``(M,)``
with ``lse_i = log Σ_{j≠i} exp(S_ij)``.

Two custom autograd functions, both exact:

- ``full``: materializes ``S`` once, turns it into the softmax ``P`` in place (max subtraction, so no
  overflow at any temperature) and keeps only ``P`` for the backward pass. The backward of
  ``Σ_i g_i lse_i`` is ``(G + Gᵀ) z`` with ``G = diag(g) P``, computed as two matrix products
  ``g ⊙ (P z) + Pᵀ (g ⊙ z)`` (BLAS reads the transpose for free). Writing ``P + Pᵀ`` first to save
  one product was measured slower on the CPU (docs/LOSSES.md): the transposed add is a cache-hostile
  pass over ``M²`` elements that costs more than the product it saves.
- ``chunked``: processes ``chunk`` rows at a time, so the extra memory is ``O(M · chunk)`` instead of
  ``O(M²)``; only ``z`` and ``lse`` are saved. The backward recomputes each row block ``S_r`` and uses
  the symmetry of ``S``: the block of ``Pᵀ`` is ``exp(S_r - lse[None, :])``, so
  ``(G + Gᵀ)_r = g_r exp(S_r - lse_r) + g exp(S_r - lse)`` needs one product per block.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from harness.losses._common import autocast_disabled

# Default block: about 2M logits (8 MiB in float32) per row block, measured as fast as larger
# blocks on the CPU while keeping the extra memory small.
_BLOCK_ELEMENTS = 1 << 21
# Above this many logits (1 GiB in float32) ``fast`` switches from the full matrix to row blocks.
FULL_MATRIX_LIMIT = 1 << 28


def default_chunk(m: int) -> int:
    return max(32, min(m, _BLOCK_ELEMENTS // max(m, 1)))


def _softmax_rows_(s: Tensor) -> Tensor:
    """Turn ``s`` into its row softmax in place; return the row log-sum-exp ``(rows,)``."""
    m = s.amax(dim=1, keepdim=True)
    s.sub_(m).exp_()
    total = s.sum(dim=1, keepdim=True)
    s.div_(total)
    return (m + total.log()).squeeze(1)


def _lse_rows_(s: Tensor) -> Tensor:
    """The row log-sum-exp of ``s``, overwriting ``s`` with ``exp(s - rowmax)``."""
    m = s.amax(dim=1, keepdim=True)
    s.sub_(m).exp_()
    return (m + s.sum(dim=1, keepdim=True).log()).squeeze(1)


class _FullSelfLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, z: Tensor) -> Tensor:
        s = z @ z.T
        s.fill_diagonal_(float("-inf"))
        lse = _softmax_rows_(s)
        ctx.save_for_backward(z, s)
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_lse: Tensor) -> Tensor:
        z, p = ctx.saved_tensors  # type: ignore[attr-defined]
        with autocast_disabled(z):
            g = grad_lse.unsqueeze(1)
            grad = torch.mm(p, z).mul_(g)
            grad.addmm_(p.T, z * g)
            return grad


class _ChunkedSelfLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, z: Tensor, chunk: int) -> Tensor:
        m = z.shape[0]
        lse = z.new_empty(m)
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            s = z[start:stop] @ z.T
            # Row i of the block is anchor start + i: its self-similarity sits at column start + i.
            s.diagonal(offset=start).fill_(float("-inf"))
            lse[start:stop] = _lse_rows_(s)
        ctx.save_for_backward(z, lse)
        ctx.chunk = chunk  # type: ignore[attr-defined]
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_lse: Tensor) -> tuple[Tensor, None]:
        z, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        with autocast_disabled(z):
            chunk: int = ctx.chunk  # type: ignore[attr-defined]
            m = z.shape[0]
            grad = torch.empty_like(z)
            g_cols = grad_lse.unsqueeze(0)
            for start in range(0, m, chunk):
                stop = min(start + chunk, m)
                s = z[start:stop] @ z.T
                s.diagonal(offset=start).fill_(float("-inf"))
                # The block of Pᵀ, from the symmetry of S: P_ji = exp(S_ij - lse_j).
                transposed = (s - lse.unsqueeze(0)).exp_().mul_(g_cols)
                s.sub_(lse[start:stop].unsqueeze(1)).exp_().mul_(grad_lse[start:stop].unsqueeze(1))
                s.add_(transposed)
                torch.mm(s, z, out=grad[start:stop])
            return grad, None


def self_excluded_lse(z: Tensor, *, chunk_size: int | None = None, chunked: bool | None = None) -> Tensor:
    """``lse_i = log Σ_{j≠i} exp(z_i · z_j)`` for ``z`` of shape ``(M, D)``; returns ``(M,)``.

    ``chunked=None`` picks the full matrix unless it would exceed ``FULL_MATRIX_LIMIT`` logits or a
    ``chunk_size`` is given.
    """
    m = z.shape[0]
    if chunked is None:
        chunked = chunk_size is not None or m * m > FULL_MATRIX_LIMIT
    if not chunked:
        return _FullSelfLSE.apply(z)
    chunk = default_chunk(m) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return _ChunkedSelfLSE.apply(z, chunk)
