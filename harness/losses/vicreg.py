"""VICReg: variance, invariance and covariance regularization.

Bardes, Ponce and LeCun 2022, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning" (ICLR), equations (1)-(6) and the official implementation's scaling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.losses._common import (
    autocast_off,
    checked_inputs,
)
from harness.losses.barlow_twins import CROSS_CORRELATION_SHAPES, frobenius_sq_cross
from harness.losses.declaration import LossSpec, pair_inputs

NAME = "vicreg"
VAR_EPS = 1e-4


@autocast_off
def vicreg(
    z1: Tensor,
    z2: Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    *,
    impl: str = "fast",
) -> Tensor:
    """``sim_coeff · MSE(z1, z2) + std_coeff · variance + cov_coeff · covariance``.

    Bardes, Ponce and LeCun 2022, "VICReg: Variance-Invariance-Covariance Regularization for
    Self-Supervised Learning". The scaling is the official code's: the variance term is
    ``mean_j relu(1 - sqrt(Var(z_j) + 1e-4))`` averaged over the two branches (each halved), the
    covariance term ``Σ_{i≠j} Cov_ij² / D`` summed over the two branches, with the unbiased
    (N - 1) covariance.

    Args:
        z1, z2: ``(N, D)`` embeddings of the two views. N ≥ 2 (unbiased variance).
        sim_coeff, std_coeff, cov_coeff: the weights λ, μ, ν of the paper.
        impl: ``"reference"`` (both ``(D, D)`` covariances materialized, off-diagonal masked) or
            ``"fast"`` (``Σ_{i≠j} Cov_ij² = ‖Cov‖²_F - Σ_j Var_j²`` with ``‖Cov‖²_F`` from the
            ``(N, N)`` Gram matrix ``‖x xᵀ‖²_F / (N-1)²`` when ``2N < D``, and the variances of the
            variance term reused).

    Returns:
        A scalar; float32 for 16-bit inputs, else the input dtype.
    """
    z1, z2 = checked_inputs(NAME, impl, min_batch=SPEC.min_batch, why=SPEC.min_batch_why, z1=z1, z2=z2)
    if impl == "reference":
        return _reference(z1, z2, sim_coeff, std_coeff, cov_coeff)
    return _fast(z1, z2, sim_coeff, std_coeff, cov_coeff)


def _reference(z1: Tensor, z2: Tensor, sim_coeff: float, std_coeff: float, cov_coeff: float) -> Tensor:
    n, d = z1.shape
    repr_loss = F.mse_loss(z1, z2)
    x = z1 - z1.mean(dim=0)
    y = z2 - z2.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + VAR_EPS)
    std_y = torch.sqrt(y.var(dim=0) + VAR_EPS)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (n - 1)
    cov_y = (y.T @ y) / (n - 1)
    off_mask = ~torch.eye(d, dtype=torch.bool, device=x.device)
    cov_loss = cov_x[off_mask].pow(2).sum() / d + cov_y[off_mask].pow(2).sum() / d
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


def _branch(z: Tensor) -> tuple[Tensor, Tensor]:
    """(variance term, off-diagonal covariance² sum) of one branch ``(N, D)``."""
    n = z.shape[0]
    var, mean = torch.var_mean(z, dim=0, correction=1)
    x = z - mean
    std_term = F.relu(1 - torch.sqrt(var + VAR_EPS)).mean()
    off = frobenius_sq_cross(x, x) / ((n - 1) * (n - 1)) - var.pow(2).sum()
    return std_term, off


def _fast(z1: Tensor, z2: Tensor, sim_coeff: float, std_coeff: float, cov_coeff: float) -> Tensor:
    d = z1.shape[1]
    std1, off1 = _branch(z1)
    std2, off2 = _branch(z2)
    return sim_coeff * F.mse_loss(z1, z2) + std_coeff * (std1 + std2) / 2 + cov_coeff * (off1 + off2) / d


SPEC = LossSpec(
    NAME,
    vicreg,
    pair_inputs,
    min_batch=2,
    min_batch_why="the unbiased variance needs two samples",
    shapes=CROSS_CORRELATION_SHAPES,
    symmetric=True,
)
SPECS = (SPEC,)
