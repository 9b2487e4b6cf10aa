"""Barlow Twins' redundancy-reduction loss.

Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction" (ICML),
equation (1) and Algorithm 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from harness.losses._common import (
    autocast_off,
    blockwise_dot,
    checked_inputs,
)
from harness.losses.declaration import (
    BenchShapes,
    LossSpec,
    grid,
    pair_inputs,
)

NAME = "barlow_twins"
BN_EPS = 1e-5


@autocast_off
def barlow_twins(z1: Tensor, z2: Tensor, lambd: float = 5e-3, *, impl: str = "fast") -> Tensor:
    """``Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij²`` with ``C`` the cross-correlation of the standardized views.

    Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction".

    Args:
        z1, z2: ``(N, D)`` projections of the two views. Each column is standardized over the batch
            (mean 0, biased variance, eps 1e-5: BatchNorm without affine), then ``C = z1ᵀ z2 / N``
            is ``(D, D)``. N ≥ 2.
        lambd: λ, the weight of the off-diagonal (redundancy) term.
        impl: ``"reference"`` (``C`` materialized, the off-diagonal masked) or ``"fast"`` (when
            ``2N < D``: ``‖C‖²_F = ⟨z1 z1ᵀ, z2 z2ᵀ⟩ / N²`` from two ``(N, N)`` Gram matrices and the
            diagonal ``C_ii`` from a column-wise dot product, so ``(D, D)`` is never formed; otherwise
            ``C`` itself, with ``Σ_{i≠j} C_ij² = ‖C‖²_F - Σ_i C_ii²``). Both accumulate in float32 at
            least.

    Returns:
        A scalar (a sum over D, not a mean: the paper's scale, so λ keeps its meaning).
    """
    z1, z2 = checked_inputs(NAME, impl, min_batch=SPEC.min_batch, why=SPEC.min_batch_why, z1=z1, z2=z2)
    if impl == "reference":
        return _reference(z1, z2, lambd)
    return _fast(z1, z2, lambd)


def _reference(z1: Tensor, z2: Tensor, lambd: float) -> Tensor:
    n, d = z1.shape
    z1 = (z1 - z1.mean(dim=0)) / torch.sqrt(z1.var(dim=0, unbiased=False) + BN_EPS)
    z2 = (z2 - z2.mean(dim=0)) / torch.sqrt(z2.var(dim=0, unbiased=False) + BN_EPS)
    c = z1.T @ z2 / n
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_mask = ~torch.eye(d, dtype=torch.bool, device=c.device)
    off_diag = c[off_mask].pow(2).sum()
    return on_diag + lambd * off_diag


def _standardize(z: Tensor) -> Tensor:
    var, mean = torch.var_mean(z, dim=0, correction=0)
    return (z - mean) * torch.rsqrt(var + BN_EPS)


def frobenius_sq_cross(a: Tensor, b: Tensor) -> Tensor:
    """``‖aᵀ b‖²_F`` for ``a, b`` of shape ``(N, D)``, by the cheaper of the two identities.

    ``‖aᵀb‖²_F = tr(bᵀ a aᵀ b) = ⟨a aᵀ, b bᵀ⟩``: two ``(N, N)`` products (4N²D flops) instead of one
    ``(D, D)`` product (2ND² flops), so the Gram side wins when ``2N < D``.
    """
    n, d = a.shape
    if 2 * n < d:
        gram_a = a @ a.T
        gram_b = gram_a if b is a else b @ b.T
        return blockwise_dot(gram_a, gram_b)
    c = a.T @ b
    return blockwise_dot(c, c)


def _fast(z1: Tensor, z2: Tensor, lambd: float) -> Tensor:
    n = z1.shape[0]
    a = _standardize(z1)
    b = _standardize(z2)
    diag = (a * b).sum(dim=0) / n
    off_diag = frobenius_sq_cross(a, b) / (n * n) - diag.pow(2).sum()
    return (1 - diag).pow(2).sum() + lambd * off_diag


# Barlow Twins and VICReg share their shapes: both build a (D, D) cross-correlation/covariance of an
# (N, D) batch; the N in {256, 2048, 4096} x D in {2048, 8192} on a GPU.
CROSS_CORRELATION_SHAPES = BenchShapes(
    grid(N=[128], D=[1024]),
    grid(N=[256, 1024], D=[1024, 4096]),
    grid(N=[256, 2048, 4096], D=[2048, 8192]),
)

SPEC = LossSpec(
    NAME,
    barlow_twins,
    pair_inputs,
    min_batch=2,
    min_batch_why="the batch standardization of one sample is undefined",
    shapes=CROSS_CORRELATION_SHAPES,
    symmetric=True,
)
SPECS = (SPEC,)
