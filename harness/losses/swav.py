"""SwAV: swapped prediction of Sinkhorn-Knopp cluster codes.

Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"
(NeurIPS), section 3.1 and Algorithm 1; the Sinkhorn-Knopp step is Cuturi 2013, "Sinkhorn
Distances: Lightspeed Computation of Optimal Transport".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.losses._common import (
    autocast_off,
    check_batch,
    check_impl,
    check_matrix,
    check_positive,
    check_same_shape,
    checked_inputs,
    compute_dtype,
    upcast,
)
from harness.losses._soft_ce import paired_soft_cross_entropy
from harness.losses.declaration import (
    BenchShapes,
    LossInputs,
    LossSpec,
    Params,
    grid,
    leaf,
    prototype_scores,
)

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
            log-sum-exp, so nothing underflows or overflows at any ε) or ``"fast"`` (one
            exponential per score, ``exp((s - rowmax) / ε)``, and the rounds on two scaling
            vectors, ``Q = diag(r) P diag(c)``, one matrix-vector product per half-round; when a
            column sum would fall below ``N · tiny`` (ε → 0, unnormalized scores) it falls back to
            a first round in the log domain, so it never overflows or underflows either).

    Returns:
        ``(N, K)`` codes, each row summing to one (for ``iterations ≥ 1``), in the compute dtype
        (float32 for 16-bit scores).
    """
    check_impl("sinkhorn", impl)
    check_matrix("sinkhorn", "scores", scores)
    check_batch("sinkhorn", scores.shape[0], SINKHORN.min_batch, SINKHORN.min_batch_why)
    check_positive("sinkhorn", "epsilon", epsilon)
    if iterations < 0:
        raise ValueError(f"sinkhorn: iterations must be ≥ 0, got {iterations}")
    return sinkhorn_codes(upcast(scores, compute_dtype(scores)), None, epsilon, iterations, impl)


def _sinkhorn_reference(scores: Tensor, epsilon: float, iterations: int) -> Tensor:
    n, k = scores.shape
    log_q = scores / epsilon
    log_q = log_q - torch.logsumexp(log_q.reshape(-1), dim=0)  # Q /= sum(Q)
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(k)  # each prototype: 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n)  # each sample: 1/N
    return torch.exp(log_q + math.log(n))


def _sinkhorn_fast(scores: Tensor, epsilon: float, iterations: int) -> Tensor:
    """The first round in the log domain; later rounds on two scaling vectors (the fallback of
    :func:`_sinkhorn_linear`, exact at any ε)."""
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


def _linear_kernels(blocks: Sequence[Tensor], epsilon: float) -> tuple[Tensor, Tensor]:
    """``(exp((s - rowmax) / ε), rowmax)`` of ``G`` blocks of scores ``(R, K)``, stacked as
    ``(G, R, K)`` and ``(G, R)``: one pass and one exponential per score."""
    inverse = 1.0 / epsilon
    first = blocks[0]
    kernels = first.new_empty((len(blocks), *first.shape))
    rowmax = first.new_empty((len(blocks), first.shape[0]))
    for i, block in enumerate(blocks):
        torch.amax(block, dim=1, out=rowmax[i])
        torch.add(rowmax[i].unsqueeze(1) * -inverse, block, alpha=inverse, out=kernels[i])
    return kernels.exp_(), rowmax


def _sinkhorn_linear(blocks: list[tuple[Tensor, Tensor]], epsilon: float, iterations: int) -> tuple[Tensor, Tensor]:
    """Codes of the first block's rows for ``G`` independent problems at once, the Sinkhorn rounds
    (≥ 1) running over the rows of all blocks (the batch, then a queue) in the linear domain; and
    a ``(G,)`` mask of the problems whose codes keep float precision (the others need the log domain).

    Each block is ``(P, shift)``, ``P`` of shape ``(G, R, K)`` with ``P = exp((s - shift) / ε)``
    and a per-row shift ``(G, R)`` at or above the row maximum (:func:`_linear_kernels`: the row
    maximum, every row's largest entry 1; the multi-crop loss: the prediction softmax's
    log-sum-exp · τ, largest entry ≥ K^(-τ/ε)). The row shifts only matter in the first column
    normalization, through the row weights ``w = exp((shift - max shift) / ε)``: the column sums
    are ``Pᵀ w``; after that the row scaling absorbs them, and the rounds run on scaling vectors,
    ``Q = diag(r) P diag(c)``, one batched vector-matrix product per half-round (``bmm`` with the
    vector as the left operand: it splits the ``G`` problems over the threads, where ``mv`` on one
    problem ran on one thread; docs/LOSSES.md). A row weight or an entry that underflows loses at
    most ``rows · tiny`` of a column sum, so while every column sum stays above that floor the
    codes keep float precision; otherwise (ε → 0, scores of very different scales) the problem's
    mask entry is False and the caller takes the log-domain path for it. Overwrites the first
    block's ``P`` with the codes; the queue rows' codes are never written.
    """
    kernels = [p for p, _ in blocks]
    first = kernels[0]
    rows, k = sum(p.shape[1] for p in kernels), first.shape[2]
    floor = rows * torch.finfo(first.dtype).tiny
    inverse = 1.0 / epsilon
    top = blocks[0][1].amax(dim=1)
    for _, m in blocks[1:]:
        top = torch.maximum(top, m.amax(dim=1))
    column: Tensor | None = None
    for p, m in blocks:
        weights = torch.sub(m, top.unsqueeze(1)).mul_(inverse).exp_().unsqueeze(1)
        part = torch.bmm(weights, p)
        column = part if column is None else column.add_(part)
    assert column is not None
    lowest = column.amin(dim=2)
    row_scales: list[Tensor] = []
    for round_ in range(iterations):
        if round_ > 0:
            column = torch.bmm(row_scales[0], kernels[0])
            for p, r in zip(kernels[1:], row_scales[1:]):
                column.baddbmm_(r, p)
            lowest = torch.minimum(lowest, column.amin(dim=2))
        column_scale = column.mul_(k).reciprocal_()
        row_scales = [torch.bmm(column_scale, p.transpose(1, 2)).mul_(rows).reciprocal_() for p in kernels]
    codes = first.mul_(row_scales[0].mul_(rows).transpose(1, 2)).mul_(column_scale)
    return codes, (lowest >= floor).squeeze(1)


def sinkhorn_codes(
    scores: Tensor, queue_scores: Tensor | None, epsilon: float, iterations: int, impl: str
) -> Tensor:
    """Codes ``(N, K)`` of the batch ``scores``, Sinkhorn-Knopp running over the batch and (when
    given) the queue's scores ``(Q, K)`` stacked below it. No gradient; ``impl`` as in :func:`sinkhorn`."""
    with torch.no_grad():
        scores = scores.detach()
        if impl == "fast" and iterations > 0:
            blocks = [_linear_kernels([scores], epsilon)]
            if queue_scores is not None:
                blocks.append(_linear_kernels([queue_scores.detach().to(scores.dtype)], epsilon))
            codes, healthy = _sinkhorn_linear(blocks, epsilon, iterations)
            if bool(healthy[0]):
                return codes[0]
        return _sinkhorn_log_domain(scores, queue_scores, epsilon, iterations, impl)


def _sinkhorn_log_domain(
    scores: Tensor, queue_scores: Tensor | None, epsilon: float, iterations: int, impl: str
) -> Tensor:
    with torch.no_grad():
        n = scores.shape[0]
        stacked = (
            scores if queue_scores is None else torch.cat([scores, queue_scores.detach().to(scores.dtype)])
        )
        if impl == "reference":
            return _sinkhorn_reference(stacked, epsilon, iterations)[:n]
        return _sinkhorn_fast(stacked, epsilon, iterations)[:n]


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
    The codes carry no gradient. Two views; :func:`swav_multicrop` is the multi-crop form.

    Args:
        scores1, scores2: ``(N, K)`` scores of the two views against the K prototypes (the
            method normalizes the prototypes and the embeddings).
        temperature: τ of the prediction softmax.
        epsilon, sinkhorn_iterations: passed to :func:`sinkhorn`.
        impl: ``"reference"`` (codes by the official loop; ``Σ q log_softmax`` materialized) or
            ``"fast"`` (codes by the linear-domain Sinkhorn; both cross-entropies one custom
            autograd function with one exponential per score, backward
            ``(softmax(s / τ) - q) / (2 N τ)`` in one pass).

    Returns:
        A scalar; float32 for 16-bit inputs, else the input dtype.
    """
    check_positive(NAME, "temperature", temperature)
    scores1, scores2 = checked_inputs(
        NAME, impl, min_batch=SWAV.min_batch, why=SWAV.min_batch_why, scores1=scores1, scores2=scores2
    )
    return _swapped_prediction([scores1, scores2], 2, None, temperature, epsilon, sinkhorn_iterations, impl)


@autocast_off
def swav_multicrop(
    scores: Tensor | Sequence[Tensor],
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    *,
    n_global: int = 2,
    queue_scores: Sequence[Tensor] | None = None,
    impl: str = "fast",
) -> Tensor:
    """SwAV's swapped prediction over every crop pair (multi-crop), with an optional queue.

    Caron et al. 2020, eq. (1)-(3) and sec. 3.1/4.1 ("multi-crop", "small batches"): each of the
    ``n_global`` global crops ``i`` gets Sinkhorn codes ``q_i`` (computed over the batch and, when
    given, the queue's scores ``queue_scores[i]`` stacked below it, of which only the batch rows
    are kept); every other crop ``v`` predicts them, ``ℓ(p_v, q_i)``; the loss is the mean over
    those ``n_global · (V - 1)`` pairs (the official code's and lightly's normalization). With two
    crops and no queue it equals :func:`swav`.

    Args:
        scores: the ``V`` crops' scores against the prototypes, a ``(V, N, K)`` tensor or ``V``
            tensors ``(N, K)``; the first ``n_global`` are the global crops.
        temperature, epsilon, sinkhorn_iterations: as in :func:`swav`.
        n_global: how many leading crops have codes (1 ≤ n_global ≤ V, and V ≥ 2).
        queue_scores: None, or one ``(Q, K)`` tensor per global crop (the queue's stored
            embeddings scored against the current prototypes).
        impl: ``"reference"`` (codes by the official log-domain loop, one ``log_softmax`` product
            per pair) or ``"fast"`` (linear-domain Sinkhorn that never writes the queue rows'
            codes; the cross-entropies from per-view sums, ``V + G`` dot products instead of
            ``G · (V - 1)`` log-softmax products, one exponential per score).

    Returns:
        A scalar; float32 for 16-bit inputs, else the input dtype.
    """
    name = "swav_multicrop"
    check_impl(name, impl)
    check_positive(name, "temperature", temperature)
    views = list(scores.unbind(0)) if isinstance(scores, Tensor) and scores.ndim == 3 else list(scores)
    if isinstance(scores, Tensor) and scores.ndim != 3:
        raise ValueError(
            f"{name}: scores must be (V, N, K) or a sequence of (N, K), got {tuple(scores.shape)}"
        )
    if len(views) < 2:
        raise ValueError(f"{name}: need at least 2 crops, got {len(views)}")
    if not 1 <= n_global <= len(views):
        raise ValueError(f"{name}: n_global must be between 1 and the {len(views)} crops, got {n_global}")
    for v, view in enumerate(views):
        check_matrix(name, f"scores[{v}]", view)
    check_same_shape(name, **{f"scores[{v}]": view for v, view in enumerate(views)})
    check_batch(name, views[0].shape[0], SWAV_MULTICROP.min_batch, SWAV_MULTICROP.min_batch_why)
    queue: list[Tensor] | None = None
    if queue_scores is not None:
        queue = list(queue_scores)
        if len(queue) != n_global:
            raise ValueError(
                f"{name}: queue_scores needs one tensor per global crop ({n_global}), got {len(queue)}"
            )
        for i, q in enumerate(queue):
            check_matrix(name, f"queue_scores[{i}]", q)
            if q.shape[1] != views[0].shape[1]:
                raise ValueError(
                    f"{name}: queue_scores[{i}] has {q.shape[1]} prototypes, the scores {views[0].shape[1]}"
                )
    dtype = compute_dtype(*views, *(queue or []))
    stacked = upcast(scores, dtype) if isinstance(scores, Tensor) else None
    views = list(stacked.unbind(0)) if stacked is not None else [upcast(view, dtype) for view in views]
    return _swapped_prediction(
        views, n_global, queue, temperature, epsilon, sinkhorn_iterations, impl, stacked=stacked
    )


def _swapped_prediction(
    views: list[Tensor],
    n_global: int,
    queue: list[Tensor] | None,
    temperature: float,
    epsilon: float,
    iterations: int,
    impl: str,
    *,
    stacked: Tensor | None = None,
) -> Tensor:
    """The loss of :func:`swav_multicrop` on checked inputs; ``stacked`` is the ``(V, N, K)``
    tensor that ``views`` were unbound from, if any (the fast path then returns one gradient)."""
    if impl == "reference":
        codes = [
            sinkhorn_codes(views[i], None if queue is None else queue[i], epsilon, iterations, impl)
            for i in range(n_global)
        ]
        log_p = [F.log_softmax(view / temperature, dim=1) for view in views]
        terms = [
            -(q * log_p[v]).sum(dim=1).mean()
            for i, q in enumerate(codes)
            for v in range(len(views))
            if v != i
        ]
        return torch.stack(terms).mean()
    power = _kernel_power(temperature, epsilon)

    def codes_from(scores: list[Tensor], probs: list[Tensor], shifts: list[Tensor]) -> list[Tensor]:
        queues = None if queue is None else [q.detach().to(scores[0].dtype) for q in queue]
        if iterations == 0:
            return [
                _sinkhorn_log_domain(scores[i], None if queues is None else queues[i], epsilon, 0, "fast")
                for i in range(n_global)
            ]
        # With threads to split them over, the global crops' Sinkhorn problems run together,
        # stacked (G, N, K), one bmm per half-round; on one thread one after the other, each
        # kernel made just before its rounds (at N = 1024 two kernels no longer fit the cache
        # together: stacked was 1.1x slower there on one thread; docs/LOSSES.md).
        together = torch.get_num_threads() > 1
        groups = [range(n_global)] if together else [range(i, i + 1) for i in range(n_global)]
        kernel = probs[0].new_empty((n_global, *probs[0].shape)) if power is not None else None
        shift = torch.stack(shifts[:n_global]) if power is not None else None
        codes: list[Tensor] = []
        healthy: list[bool] = []
        for group in groups:
            part = slice(group.start, group.stop)
            if kernel is not None and shift is not None:
                # The prediction softmax is exp((s - shift) / τ) (shift: the row log-sum-exp · τ),
                # so exp((s - shift) / ε) is its power τ / ε: a square at the defaults.
                for i in group:
                    if power == 1:
                        kernel[i].copy_(probs[i])
                    else:
                        torch.pow(probs[i], power, out=kernel[i])
                blocks = [(kernel[part], shift[part])]
            else:
                blocks = [_linear_kernels(scores[part], epsilon)]
            if queues is not None:
                blocks.append(_linear_kernels(queues[part], epsilon))
            stacked_codes, fine = _sinkhorn_linear(blocks, epsilon, iterations)
            codes.extend(stacked_codes.unbind(0))
            healthy.extend(fine.tolist())
        for i, fine in enumerate(healthy):
            if not fine:
                codes[i] = _sinkhorn_log_domain(
                    scores[i], None if queues is None else queues[i], epsilon, iterations, "fast"
                )
        return codes

    # Codes rows sum to one after a Sinkhorn round; with zero rounds they carry the raw mass.
    source = stacked if stacked is not None else views
    return paired_soft_cross_entropy(
        source, codes_from, 1.0 / temperature, skip_same_index=True, unit_rows=iterations > 0
    )


def _kernel_power(temperature: float, epsilon: float) -> int | None:
    """τ / ε when it is a whole number from 1 to 4 (the Sinkhorn kernel is then a power of the
    softmax's exponentials: a square at SwAV's defaults), else None."""
    ratio = temperature / epsilon
    power = round(ratio)
    return power if 1 <= power <= 4 and abs(ratio - power) <= 1e-12 * ratio else None


def _swav_inputs(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> LossInputs:
    s1 = leaf(prototype_scores((p["N"], p["K"]), device, dtype, gen))
    s2 = leaf(prototype_scores((p["N"], p["K"]), device, dtype, gen))
    kwargs = {"temperature": 0.1, "epsilon": 0.05, "sinkhorn_iterations": 3}
    return LossInputs((s1, s2), kwargs, (s1, s2))


def _multicrop_inputs(
    p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator
) -> LossInputs:
    """``V`` crops' scores as one ``(V, N, K)`` tensor (the method scores all crops in one product);
    with ``Q > 0`` a queue of ``Q`` earlier embeddings per global crop, scored (no gradient)."""
    scores = leaf(prototype_scores((p["V"], p["N"], p["K"]), device, dtype, gen))
    kwargs: dict[str, object] = {"temperature": 0.1, "epsilon": 0.05, "sinkhorn_iterations": 3}
    if p.get("Q", 0) > 0:
        kwargs["queue_scores"] = [prototype_scores((p["Q"], p["K"]), device, dtype, gen) for _ in range(2)]
    return LossInputs((scores,), kwargs, (scores,))


def _sinkhorn_inputs(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> LossInputs:
    return LossInputs(
        (prototype_scores((p["N"], p["K"]), device, dtype, gen),), {"epsilon": 0.05, "iterations": 3}, ()
    )


SWAV = LossSpec(
    NAME,
    swav,
    _swav_inputs,
    min_batch=1,
    min_batch_why="an empty batch has no mean",
    shapes=BenchShapes(grid(N=[256], K=[3000]), grid(N=[256, 1024], K=[3000]), grid(N=[256, 1024], K=[3000])),
    width_key="K",
    symmetric=True,
    temperature_kw=("temperature",),
)
# Caron et al.'s multi-crop: 2 global crops and 6 local ones (V = 8); the queue of their small-batch
# runs (3840 rows) with a batch of 256.
SWAV_MULTICROP = LossSpec(
    "swav_multicrop",
    swav_multicrop,
    _multicrop_inputs,
    min_batch=1,
    min_batch_why="an empty batch has no mean",
    shapes=BenchShapes(
        grid(N=[128], K=[1000], V=[4], Q=[0]),
        grid(N=[256], K=[3000], V=[2, 8], Q=[0, 3840]),
        grid(N=[256, 1024], K=[3000], V=[2, 8], Q=[0, 3840]),
    ),
    width_key="K",
    test_params={"V": 4, "Q": 0},
    temperature_kw=("temperature",),
)
SINKHORN = LossSpec(
    "sinkhorn",
    sinkhorn,
    _sinkhorn_inputs,
    min_batch=1,
    min_batch_why="an empty batch has no codes",
    shapes=BenchShapes(grid(N=[256], K=[3000]), grid(N=[256, 4096], K=[3000]), grid(N=[256, 4096], K=[3000])),
    directions=("forward",),
    width_key="K",
    loss=False,
)
SPECS = (SWAV, SWAV_MULTICROP, SINKHORN)
