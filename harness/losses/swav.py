"""SwAV: swapped prediction of Sinkhorn-Knopp cluster codes.

Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"
(NeurIPS), section 3.1 and Algorithm 1; the Sinkhorn-Knopp step is Cuturi 2013, "Sinkhorn
Distances: Lightspeed Computation of Optimal Transport".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.losses._common import (
    check_batch,
    check_impl,
    check_matrix,
    check_positive,
    check_same_shape,
    compute_dtype,
    upcast,
)

NAME = "swav"


def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3, *, impl: str = "fast") -> Tensor:
    """Equipartitioned soft cluster codes from prototype scores, with no gradient.

    Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
    Assignments", Algorithm 1 (``distributed_sinkhorn`` on one process): ``Q = exp(scores / ε)``,
    then ``iterations`` rounds of normalizing the prototypes (rows of ``Qᵀ``) to 1/K and the samples
    to 1/N; returned scaled so that each sample's code sums to one.

    Args:
        scores: ``(N, K)`` scores of N samples against K prototypes (a method with a queue passes
            the batch and the queue stacked, and keeps the first N rows).
        epsilon: ε > 0, the entropic regularization (smaller = sharper codes).
        iterations: Sinkhorn-Knopp rounds (≥ 0).
        impl: ``"reference"`` (the official loop: four passes over the ``(K, N)`` matrix per round)
            or ``"fast"`` (the same iteration on two scaling vectors, ``Q = diag(r) P diag(c)``:
            one matrix-vector product per half-round, ``Q`` written once at the end).

    Returns:
        ``(N, K)`` codes, rows summing to one, in the compute dtype (float32 for 16-bit scores).
        ``scores.max()`` is subtracted before the exponential (it cancels in the normalization), so
        no ε overflows; a prototype whose every score underflows gets zero mass instead of NaN.
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
    tiny = torch.finfo(scores.dtype).tiny
    q = torch.exp((scores - scores.max()) / epsilon).T  # (K, N)
    k, b = q.shape
    q /= q.sum().clamp_min(tiny)
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True).clamp_min(tiny)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
        q /= b
    q *= b
    return q.T


def _sinkhorn_fast(scores: Tensor, epsilon: float, iterations: int) -> Tensor:
    tiny = torch.finfo(scores.dtype).tiny
    n, k = scores.shape
    p = torch.exp((scores - scores.max()) / epsilon)  # (N, K), entries in (0, 1]
    # Q = diag(r) P diag(c). The reference's first step (divide by the total) only rescales r,
    # which the first prototype normalization absorbs into c; it matters only with 0 iterations.
    r = torch.full((n,), 1.0, dtype=p.dtype, device=p.device) / p.sum().clamp_min(tiny)
    c = torch.ones(k, dtype=p.dtype, device=p.device)
    for _ in range(iterations):
        c = c / ((p.T @ r) * c * k).clamp_min(tiny)
        r = r / ((p @ c) * r * n).clamp_min(tiny)
    return p.mul_(r.unsqueeze(1)).mul_(c.unsqueeze(0)).mul_(n)


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
            ``"fast"`` (codes by the scaling-vector Sinkhorn; the cross-entropy as
            ``logsumexp(s / τ) - q·s / τ``, valid because each code sums to one, so no
            ``(N, K)`` log-softmax is written).

    Returns:
        A scalar; float32 for 16-bit inputs, else the input dtype.
    """
    check_impl(NAME, impl)
    check_matrix(NAME, "scores1", scores1)
    check_matrix(NAME, "scores2", scores2)
    check_same_shape(NAME, scores1=scores1, scores2=scores2)
    check_batch(NAME, scores1.shape[0], 1, "an empty batch has no mean")
    check_positive(NAME, "temperature", temperature)
    dtype = compute_dtype(scores1, scores2)
    scores1, scores2 = upcast(scores1, dtype), upcast(scores2, dtype)
    q1 = sinkhorn(scores1, epsilon, sinkhorn_iterations, impl=impl)
    q2 = sinkhorn(scores2, epsilon, sinkhorn_iterations, impl=impl)
    if impl == "reference":
        p1 = F.log_softmax(scores1 / temperature, dim=1)
        p2 = F.log_softmax(scores2 / temperature, dim=1)
        return -0.5 * ((q1 * p2).sum(dim=1).mean() + (q2 * p1).sum(dim=1).mean())
    s1 = scores1 / temperature
    s2 = scores2 / temperature
    cross = (q2 * s1).sum(dim=1) + (q1 * s2).sum(dim=1)
    return 0.5 * (torch.logsumexp(s1, dim=1) + torch.logsumexp(s2, dim=1) - cross).mean()
