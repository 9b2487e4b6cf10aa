"""SwAV: swapped prediction of Sinkhorn-Knopp cluster codes.

Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"
(NeurIPS), section 3.1 and Algorithm 1; the Sinkhorn-Knopp step is Cuturi 2013, "Sinkhorn
Distances: Lightspeed Computation of Optimal Transport".
"""

from __future__ import annotations

import math

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
    upcast,
)
from harness.losses._soft_ce import soft_target_cross_entropy

NAME = "swav"


@autocast_off
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3, *, impl: str = "fast") -> Tensor:
    """Equipartitioned soft cluster codes from prototype scores, with no gradient.

    Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
    Assignments", Algorithm 1 (``distributed_sinkhorn`` on one process): ``Q = exp(scores / ε)``
    normalized to sum 1, then ``iterations`` rounds of normalizing each prototype's mass to 1/K
    and each sample's to 1/N; returned times N so that each sample's code sums to one.

    Args:
        scores: ``(N, K)`` scores of N samples against K prototypes (a method with a queue passes
            the batch and the queue stacked, and keeps the first N rows).
        epsilon: ε > 0, the entropic regularization (smaller = sharper codes).
        iterations: Sinkhorn-Knopp rounds (≥ 0; SwAV uses 3).
        impl: ``"reference"`` (the official loop, in the log domain: each normalization a
            log-sum-exp, so nothing underflows or overflows at any ε) or ``"fast"`` (the first round
            in the log domain, which leaves a kernel ``P`` whose rows sum to one and whose columns
            all have an entry ≥ 1/(NK); the remaining rounds on two scaling vectors,
            ``Q = diag(r) P diag(c)``, one matrix-vector product per half-round).

    Returns:
        ``(N, K)`` codes, each row summing to one (for ``iterations ≥ 1``), in the compute dtype
        (float32 for 16-bit scores).
    """
    check_impl("sinkhorn", impl)
    check_matrix("sinkhorn", "scores", scores)
    check_batch("sinkhorn", scores.shape[0], 1, "an empty batch has no codes")
    check_positive("sinkhorn", "epsilon", epsilon)
    if iterations < 0:
        raise ValueError(f"sinkhorn: iterations must be ≥ 0, got {iterations}")
    with torch.no_grad():
        scores = upcast(scores.detach(), compute_dtype(scores))
        if impl == "reference":
            return _sinkhorn_reference(scores, epsilon, iterations)
        return _sinkhorn_fast(scores, epsilon, iterations)


def _sinkhorn_reference(scores: Tensor, epsilon: float, iterations: int) -> Tensor:
    n, k = scores.shape
    log_q = scores / epsilon
    log_q = log_q - torch.logsumexp(log_q.reshape(-1), dim=0)  # Q /= sum(Q)
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(k)  # each prototype: 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n)  # each sample: 1/N
    return torch.exp(log_q + math.log(n))


def _sinkhorn_fast(scores: Tensor, epsilon: float, iterations: int) -> Tensor:
    n, k = scores.shape
    a = scores / epsilon
    if iterations == 0:
        return a.sub_(torch.logsumexp(a.reshape(-1), dim=0)).exp_().mul_(n)
    # Round one in the log domain. The total and the 1/K, 1/N constants cancel: after it
    # Q = P / N with P = exp(a - L_k - R_i), L the prototypes' and R the samples' log-sum-exp.
    a.sub_(torch.logsumexp(a, dim=0, keepdim=True))
    p = a.sub_(torch.logsumexp(a, dim=1, keepdim=True)).exp_()
    r = torch.full((n,), 1.0 / n, dtype=p.dtype, device=p.device)
    c = torch.ones(k, dtype=p.dtype, device=p.device)
    for _ in range(iterations - 1):
        c = (p.T @ r).mul_(k).reciprocal_()
        r = (p @ c).mul_(n).reciprocal_()
    return p.mul_(r.unsqueeze(1)).mul_(c.unsqueeze(0)).mul_(n)


@autocast_off
def swav(
    scores1: Tensor,
    scores2: Tensor,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    *,
    impl: str = "fast",
) -> Tensor:
    """Swapped prediction: each view's softmax predicts the other view's Sinkhorn codes.

    Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
    Assignments", equations (1)-(2): ``½ mean_n [ ℓ(p2, q1) + ℓ(p1, q2) ]`` with
    ``ℓ(p, q) = -Σ_k q_k log p_k``, ``p = softmax(scores / τ)`` and ``q = sinkhorn(scores)``.
    The codes carry no gradient. Two views only: a multi-crop method calls this per pair (or
    calls :func:`sinkhorn` itself).

    Args:
        scores1, scores2: ``(N, K)`` scores of the two views against the K prototypes (the
            method normalizes the prototypes and the embeddings).
        temperature: τ of the prediction softmax.
        epsilon, sinkhorn_iterations: passed to :func:`sinkhorn`.
        impl: ``"reference"`` (codes by the official loop; ``Σ q log_softmax`` materialized) or
            ``"fast"`` (codes by the scaling-vector Sinkhorn; each cross-entropy one custom
            autograd function that keeps only the softmax, backward ``(softmax(s / τ) - q) / (N τ)``).

    Returns:
        A scalar; float32 for 16-bit inputs, else the input dtype.
    """
    check_positive(NAME, "temperature", temperature)
    scores1, scores2 = checked_inputs(
        NAME, impl, min_batch=1, why="an empty batch has no mean", scores1=scores1, scores2=scores2
    )
    q1 = sinkhorn(scores1, epsilon, sinkhorn_iterations, impl=impl)
    q2 = sinkhorn(scores2, epsilon, sinkhorn_iterations, impl=impl)
    if impl == "reference":
        p1 = F.log_softmax(scores1 / temperature, dim=1)
        p2 = F.log_softmax(scores2 / temperature, dim=1)
        return -0.5 * ((q1 * p2).sum(dim=1).mean() + (q2 * p1).sum(dim=1).mean())
    scale = 1.0 / temperature
    return 0.5 * (
        soft_target_cross_entropy(scores1, q2, scale) + soft_target_cross_entropy(scores2, q1, scale)
    )
