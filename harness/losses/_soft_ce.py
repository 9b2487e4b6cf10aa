"""Cross-entropy of soft targets against a softmax, as one custom autograd function.

Shared by the fast DINO and SwAV. For logits ``x = scale · s`` of shape ``(N, K)`` and targets ``t``
(no gradient), ``mean_i Σ_k -t_ik log softmax(x_i)_k = mean_i [ lse(x_i) Σ_k t_ik - t_i·x_i ]``.
The forward pass writes one ``(N, K)`` buffer, turns it into the softmax ``P`` in place (max
subtraction: safe at any temperature) and keeps it; the backward pass is a single elementwise pass,
``scale · (P Σ_k t_k - t) / N``. Autograd through ``log_softmax`` (the reference) keeps the
log-probabilities and the product with the targets and runs three passes for the same gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from harness.losses._common import autocast_disabled


class _SoftTargetCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, scores: Tensor, targets: Tensor, scale: float) -> Tensor:
        x = scores * scale
        cross = (targets * x).sum(dim=1)
        mass = targets.sum(dim=1)
        m = x.amax(dim=1, keepdim=True)
        x.sub_(m).exp_()
        total = x.sum(dim=1, keepdim=True)
        x.div_(total)
        lse = (m + total.log()).squeeze(1)
        ctx.save_for_backward(x, targets, mass)
        ctx.scale = scale  # type: ignore[attr-defined]
        return (lse * mass - cross).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        p, targets, mass = ctx.saved_tensors  # type: ignore[attr-defined]
        with autocast_disabled(p):
            coefficient = grad * (ctx.scale / p.shape[0])  # type: ignore[attr-defined]
            return (p * mass.unsqueeze(1) - targets).mul_(coefficient), None, None


def soft_target_cross_entropy(scores: Tensor, targets: Tensor, scale: float) -> Tensor:
    """``mean_i Σ_k -targets_ik log softmax(scale · scores_i)_k``; ``scores, targets`` ``(N, K)``."""
    return _SoftTargetCE.apply(scores, targets.detach(), scale)
