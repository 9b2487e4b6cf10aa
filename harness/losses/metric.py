"""Metric-learning losses: the triplet loss and the multi-class N-pair loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from harness.losses._common import (
    autocast_disabled,
    autocast_off,
    checked_inputs,
)
from harness.losses.declaration import (
    BenchShapes,
    LossInputs,
    LossSpec,
    Params,
    grid,
    leaf,
    pair_inputs,
    randn,
)


@autocast_off
def triplet(
    anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 1.0, *, impl: str = "fast"
) -> Tensor:
    """``mean_i max(0, ‖a_i - p_i‖² - ‖a_i - n_i‖² + margin)`` on raw (unnormalized) embeddings.

    Schroff, Kalenichenko and Philbin 2015, "FaceNet: A Unified Embedding for Face Recognition and
    Clustering" (CVPR), equation (1); Weinberger and Saul 2009 for the large-margin idea.

    Args:
        anchor, positive, negative: ``(N, D)`` each.
        margin: α, the required gap between the squared distances.
        impl: ``"reference"`` (both squared distances, autograd through them) or ``"fast"`` (a
            custom autograd function: the forward pass keeps the two difference vectors and the
            hinge's active set, the backward pass writes ``±2 w (a - p)``, ``±2 w (a - n)`` directly).

    Returns:
        A scalar; float32 for 16-bit inputs, else the input dtype.
    """
    name = "triplet"
    a, p, n = checked_inputs(
        name,
        impl,
        min_batch=TRIPLET.min_batch,
        why=TRIPLET.min_batch_why,
        anchor=anchor,
        positive=positive,
        negative=negative,
    )
    if impl == "reference":
        d_pos = (a - p).pow(2).sum(dim=1)
        d_neg = (a - n).pow(2).sum(dim=1)
        return F.relu(d_pos - d_neg + margin).mean()
    return _Triplet.apply(a, p, n, float(margin))


class _Triplet(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, a: Tensor, p: Tensor, n: Tensor, margin: float) -> Tensor:
        to_positive = a - p
        to_negative = a - n
        gap = (to_positive * to_positive).sum(dim=1) - (to_negative * to_negative).sum(dim=1) + margin
        active = gap > 0
        ctx.save_for_backward(to_positive, to_negative, active)
        return gap.clamp_min(0).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        to_positive, to_negative, active = ctx.saved_tensors  # type: ignore[attr-defined]
        with autocast_disabled(to_positive):
            # d gap / d a = 2(a-p) - 2(a-n), d gap / d p = -2(a-p), d gap / d n = 2(a-n); only active rows.
            w = (active.to(to_positive.dtype) * (2 * grad / active.shape[0])).unsqueeze(1)
            grad_p = to_positive * -w
            grad_n = to_negative * w
            needs = ctx.needs_input_grad  # type: ignore[attr-defined]
            grad_a = -(grad_p + grad_n) if needs[0] else None
            return grad_a, grad_p if needs[1] else None, grad_n if needs[2] else None, None


@autocast_off
def npair(anchor: Tensor, positive: Tensor, *, impl: str = "fast") -> Tensor:
    """Multi-class N-pair loss: ``mean_i log(1 + Σ_{j≠i} exp(a_i·p_j - a_i·p_i))``.

    Sohn 2016, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective" (NeurIPS),
    equation (3), on raw dot products (no normalization, no L2 penalty: the method adds one if it
    wants).

    Args:
        anchor, positive: ``(N, D)``; the positives of the other pairs are an anchor's negatives.
            N ≥ 2.
        impl: ``"reference"`` (the differences ``a_i·p_j - a_i·p_i`` and the ``1 +`` as written, by a
            log-sum-exp over ``[0, differences_{j≠i}]``) or ``"fast"`` (the identity
            ``log(1 + Σ_{j≠i} e^{x_j - x_i}) = logsumexp_j x_j - x_i``: one cross-entropy over
            ``a pᵀ`` with targets on the diagonal).

    Returns:
        A scalar; float32 for 16-bit inputs, else the input dtype.
    """
    name = "npair"
    a, p = checked_inputs(
        name,
        impl,
        min_batch=NPAIR.min_batch,
        why=NPAIR.min_batch_why,
        anchor=anchor,
        positive=positive,
    )
    n = a.shape[0]
    logits = a @ p.T
    if impl == "reference":
        differences = logits - torch.diagonal(logits).unsqueeze(1)
        self_mask = torch.eye(n, dtype=torch.bool, device=a.device)
        others = differences.masked_fill(self_mask, float("-inf"))
        ones = torch.zeros(n, 1, dtype=a.dtype, device=a.device)  # log(1) = exp(0)
        return torch.logsumexp(torch.cat([ones, others], dim=1), dim=1).mean()
    return F.cross_entropy(logits, torch.arange(n, device=a.device))


def _triplet_inputs(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> LossInputs:
    tensors = tuple(leaf(randn((p["N"], p["D"]), device, dtype, gen)) for _ in range(3))
    # A margin of D keeps the hinges of random inputs active (the loss smooth where it is tested).
    return LossInputs(tensors, {"margin": float(p["D"])}, tensors)


TRIPLET = LossSpec(
    "triplet",
    triplet,
    _triplet_inputs,
    min_batch=1,
    min_batch_why="an empty batch has no mean",
    shapes=BenchShapes(grid(N=[4096], D=[128]), grid(N=[256, 4096], D=[128]), grid(N=[256, 4096], D=[128])),
)
NPAIR = LossSpec(
    "npair",
    npair,
    pair_inputs,
    min_batch=2,
    min_batch_why="the negatives of an anchor are the other pairs' positives",
    shapes=BenchShapes(
        grid(N=[256], D=[128]), grid(N=[256, 1024], D=[128]), grid(N=[256, 1024, 4096], D=[128])
    ),
)
SPECS = (TRIPLET, NPAIR)
