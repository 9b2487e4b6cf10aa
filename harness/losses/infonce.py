"""InfoNCE with a queue of negatives, the MoCo objective.

He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning" (CVPR),
equation (1) and Algorithm 1; the loss itself is van den Oord et al. 2018, "Representation Learning
with Contrastive Predictive Coding".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from harness.losses._common import (
    autocast_disabled,
    autocast_off,
    check_batch,
    check_impl,
    check_matrix,
    check_positive,
    check_same_shape,
    compute_dtype,
    normalize_scaled,
    softmax_and_lse,
    upcast,
)
from harness.losses.declaration import (
    BenchShapes,
    LossInputs,
    LossSpec,
    Params,
    grid,
    leaf,
    randn,
    unit_rows,
)

NAME = "infonce"


@autocast_off
def infonce(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.07, *, impl: str = "fast") -> Tensor:
    """MoCo's InfoNCE: for each query, the key of the same image against the queue of negatives.

    He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning".

    Args:
        q: ``(N, D)`` queries (normalized inside).
        k: ``(N, D)`` keys (normalized inside; the method detaches them, the loss does not).
        queue: ``(K, D)`` negatives whose rows are already unit-norm (used as given). K ≥ 1.
        temperature: τ > 0.
        impl: ``"reference"`` (logits ``[q·k, q queueᵀ] / τ`` concatenated into ``(N, 1 + K)``, then a
            cross-entropy with target 0) or ``"fast"`` (τ folded into q, no concatenation: a custom
            autograd function turns ``q queueᵀ`` into its softmax in place, joins the positive
            through the log-sum-exps and keeps only that ``(N, K)`` matrix for the backward pass).

    Returns:
        A scalar: ``mean_i [ log(exp(q_i·k_i/τ) + Σ_j exp(q_i·queue_j/τ)) - q_i·k_i/τ ]``; float32 for
        16-bit inputs, else the input dtype. Gradients reach ``queue`` too if it requires them.
    """
    check_impl(NAME, impl)
    check_matrix(NAME, "q", q)
    check_matrix(NAME, "k", k)
    check_matrix(NAME, "queue", queue)
    check_same_shape(NAME, q=q, k=k)
    check_batch(NAME, q.shape[0], SPEC.min_batch, SPEC.min_batch_why)
    if queue.shape[0] < 1:
        raise ValueError(f"{NAME}: the queue is empty, need at least one negative")
    if queue.shape[1] != q.shape[1]:
        raise ValueError(f"{NAME}: queue has dimension {queue.shape[1]}, the queries {q.shape[1]}")
    check_positive(NAME, "temperature", temperature)
    dtype = compute_dtype(q, k, queue)
    q, k, queue = upcast(q, dtype), upcast(k, dtype), upcast(queue, dtype)
    if impl == "reference":
        return _reference(q, k, queue, temperature)
    return _InfoNCE.apply(normalize_scaled(q, 1.0 / temperature), F.normalize(k, dim=1), queue)


def _reference(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.T
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


class _InfoNCE(torch.autograd.Function):
    """``q`` already scaled to norm 1/τ, ``k`` unit-norm: the logits are plain dot products.

    The queue's logits go through the fused softmax kernel, in place on the CPU (its vectorized
    exponential is faster than ``sub_`` + ``exp_`` + ``sum``; docs/LOSSES.md), and the positive
    joins through the log-sum-exps: ``lse_neg = max - log(max p)`` (``max p ≥ 1/K`` never
    underflows), ``lse = logaddexp(lse_neg, l_pos)``. The ``(N, 1 + K)`` concatenation of the
    reference is never written, and the ``(N, K)`` softmax is the only matrix kept for backward.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, q: Tensor, k: Tensor, queue: Tensor) -> Tensor:
        l_pos = (q * k).sum(dim=1)
        p_neg, lse_neg = softmax_and_lse(q @ queue.T, overwrite=True)
        lse = torch.logaddexp(lse_neg, l_pos)
        # d loss / d l_neg = p_neg * exp(lse_neg - lse): the softmax over the queue, rescaled by the
        # queue's share of the whole partition function; d / d l_pos = exp(l_pos - lse) - 1.
        ctx.save_for_backward(q, k, queue, p_neg, (lse_neg - lse).exp_(), (l_pos - lse).exp_())
        return (lse - l_pos).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        q, k, queue, p_neg, share_neg, p_pos = ctx.saved_tensors  # type: ignore[attr-defined]
        with autocast_disabled(q):
            scale = grad / q.shape[0]
            w_pos = ((p_pos - 1) * scale).unsqueeze(1)
            w_neg = (share_neg * scale).unsqueeze(1)
            needs = ctx.needs_input_grad  # type: ignore[attr-defined]
            grad_q = torch.mm(p_neg, queue).mul_(w_neg).add_(k * w_pos) if needs[0] else None
            grad_k = q * w_pos if needs[1] else None
            grad_queue = p_neg.T @ (q * w_neg) if needs[2] else None
            return grad_q, grad_k, grad_queue


def _inputs(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> LossInputs:
    q = leaf(randn((p["N"], p["D"]), device, dtype, gen))
    # MoCo detaches the keys and the queue is a buffer: gradients reach the queries only.
    k = randn((p["N"], p["D"]), device, dtype, gen)
    queue = unit_rows((p["K"], p["D"]), device, dtype, gen)
    return LossInputs((q, k, queue), {"temperature": 0.07}, (q,))


SPEC = LossSpec(
    NAME,
    infonce,
    _inputs,
    min_batch=1,
    min_batch_why="an empty batch has no mean",
    shapes=BenchShapes(
        grid(N=[256], K=[16384], D=[128]),
        grid(N=[256], K=[4096, 65536], D=[128]),
        grid(N=[256], K=[4096, 65536], D=[128]),
    ),
    test_params={"K": 11},
    scale_invariant=(0, 1),
    temperature_kw=("temperature",),
)
SPECS = (SPEC,)
