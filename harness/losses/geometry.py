"""Alignment and uniformity on the hypersphere.

Wang and Isola 2020, "Understanding Contrastive Representation Learning through Alignment and
Uniformity on the Hypersphere" (ICML), section 4.1 and their reference code.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.losses._common import (
    autocast_off,
    check_batch,
    check_impl,
    check_matrix,
    check_positive,
    checked_inputs,
    compute_dtype,
    normalize_scaled,
    upcast,
)
from harness.losses._lse import self_excluded_lse
from harness.losses.declaration import BenchShapes, LossSpec, grid, pair_inputs, single_inputs


@autocast_off
def alignment(z1: Tensor, z2: Tensor, alpha: float = 2, *, impl: str = "fast") -> Tensor:
    """``mean_i ‖ẑ1_i - ẑ2_i‖^α`` of the normalized positive pairs (lower = better aligned).

    Wang and Isola 2020, "Understanding Contrastive Representation Learning through Alignment and
    Uniformity on the Hypersphere", ``L_align``.

    Args:
        z1, z2: ``(N, D)`` embeddings of the two views (normalized inside).
        alpha: α > 0.
        impl: ``"reference"`` (``‖ẑ1 - ẑ2‖.pow(α)`` as in the paper's code) or ``"fast"``: for
            α = 2, on the sphere ``‖ẑ1 - ẑ2‖² = 2 - 2 cos`` (the row dot product over the product of
            the norms, no normalized copies, no square root, no power); for other α the
            differences, as the reference (the cosine form loses float32 precision under a power).

    Returns:
        A scalar in ``[0, 2^α]``; float32 for 16-bit inputs, else the input dtype.
    """
    name = "alignment"
    check_positive(name, "alpha", alpha)
    z1, z2 = checked_inputs(
        name, impl, min_batch=ALIGNMENT.min_batch, why=ALIGNMENT.min_batch_why, z1=z1, z2=z2
    )
    if impl == "reference":
        x = F.normalize(z1, dim=1)
        y = F.normalize(z2, dim=1)
        return (x - y).norm(p=2, dim=1).pow(alpha).mean()
    if alpha != 2:
        # 2 - 2 cos carries ~1e-7 of float32 rounding; a power below 2 magnifies that for nearly
        # aligned pairs (α = 1: 1e-4 on 1e-4 distances), so other powers take the differences.
        return (normalize_scaled(z1) - normalize_scaled(z2)).norm(p=2, dim=1).pow(alpha).mean()
    eps = 1e-12
    norms = torch.linalg.vector_norm(z1, dim=1).clamp_min(eps) * torch.linalg.vector_norm(
        z2, dim=1
    ).clamp_min(eps)
    cosine = (z1 * z2).sum(dim=1) / norms
    return 2 - 2 * cosine.mean()


@autocast_off
def uniformity(z: Tensor, t: float = 2, *, impl: str = "fast") -> Tensor:
    """``log mean_{i<j} exp(-t ‖ẑ_i - ẑ_j‖²)`` over all pairs of the batch (lower = more uniform).

    Wang and Isola 2020, "Understanding Contrastive Representation Learning through Alignment and
    Uniformity on the Hypersphere", ``L_uniform``.

    Args:
        z: ``(N, D)`` embeddings (normalized inside). N ≥ 2.
        t: t > 0.
        impl: ``"reference"`` (the N(N-1)/2 pair differences materialized, their squared norms, a
            log-mean-exp) or ``"fast"`` (on the sphere ``‖x_i - x_j‖² = 2 - 2 x_i·x_j``, so the
            pairs' exponents are ``2t x_i·x_j - 2t``: the self-excluded row log-sum-exp of the fast
            NT-Xent over ``x √(2t)``, then one more log-sum-exp over the rows).

    Returns:
        A scalar in ``[-4t, 0]``; float32 for 16-bit inputs, else the input dtype.
    """
    name = "uniformity"
    check_impl(name, impl)
    check_matrix(name, "z", z)
    check_batch(name, z.shape[0], UNIFORMITY.min_batch, UNIFORMITY.min_batch_why)
    check_positive(name, "t", t)
    z = upcast(z, compute_dtype(z))
    n = z.shape[0]
    if impl == "reference":
        x = F.normalize(z, dim=1)
        i, j = torch.triu_indices(n, n, offset=1, device=z.device)
        squared = (x[i] - x[j]).pow(2).sum(dim=1)
        return torch.logsumexp(-t * squared, dim=0) - math.log(squared.numel())
    x = normalize_scaled(z, math.sqrt(2 * t))
    # Every unordered pair appears twice among the N(N-1) ordered ones: same mean.
    return torch.logsumexp(self_excluded_lse(x), dim=0) - 2 * t - math.log(n * (n - 1))


ALIGNMENT = LossSpec(
    "alignment",
    alignment,
    pair_inputs,
    min_batch=1,
    min_batch_why="an empty batch has no mean",
    shapes=BenchShapes(grid(N=[4096], D=[128]), grid(N=[256, 4096], D=[128]), grid(N=[256, 4096], D=[128])),
    symmetric=True,
    scale_invariant=(0, 1),
)
UNIFORMITY = LossSpec(
    "uniformity",
    uniformity,
    partial(single_inputs, t=2.0),
    min_batch=2,
    min_batch_why="uniformity is a mean over pairs",
    shapes=BenchShapes(
        grid(N=[128], D=[128]), grid(N=[256, 1024], D=[128]), grid(N=[256, 1024, 4096], D=[128])
    ),
    scale_invariant=(0,),
    temperature_kw=("t",),
)
SPECS = (ALIGNMENT, UNIFORMITY)
