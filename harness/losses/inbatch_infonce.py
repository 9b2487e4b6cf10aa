"""InfoNCE against the other samples of the batch: the MoCo v3 and NNCLR objective.

Chen, Xie and He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers" (MoCo
v3), Algorithm 1 (``ctr``); Dwibedi et al. 2021, "With a Little Help from My Friends: Nearest-Neighbor
Contrastive Learning of Visual Representations" (NNCLR), eq. 2. Both are van den Oord et al.'s
InfoNCE where the keys of the other images of the batch are the negatives.
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
    upcast,
)
from harness.losses.declaration import BenchShapes, LossInputs, LossSpec, Params, grid, pair_inputs

NAME = "inbatch_infonce"


@autocast_off
def inbatch_infonce(q: Tensor, k: Tensor, temperature: float = 1.0, *, impl: str = "fast") -> Tensor:
    """For each query, its own key against the keys of the other images of the batch.

    Args:
        q: ``(N, D)`` queries (normalized inside): MoCo v3's predictor outputs, NNCLR's nearest
            neighbours from the support set.
        k: ``(N, D)`` keys (normalized inside): MoCo v3's momentum keys, NNCLR's predictions.
        temperature: τ > 0.
        impl: ``"reference"`` (the formula as written: logits ``s = q̂ k̂ᵀ / τ``, then a
            cross-entropy with the diagonal as the targets) or ``"fast"`` (τ folded into the
            query's normalization; a custom autograd function turns the ``(N, N)`` logits into
            their softmax in place and keeps only that matrix for the backward pass).

    Returns:
        A scalar: ``mean_i [ log Σ_j exp(q̂_i·k̂_j/τ) - q̂_i·k̂_i/τ ]`` (MoCo v3 multiplies it by 2τ;
        the method does). float32 for 16-bit inputs, else the input dtype.
    """
    check_impl(NAME, impl)
    check_matrix(NAME, "q", q)
    check_matrix(NAME, "k", k)
    check_same_shape(NAME, q=q, k=k)
    check_batch(NAME, q.shape[0], SPEC.min_batch, SPEC.min_batch_why)
    check_positive(NAME, "temperature", temperature)
    dtype = compute_dtype(q, k)
    q, k = upcast(q, dtype), upcast(k, dtype)
    if impl == "reference":
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / temperature
        return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))
    return _InBatchInfoNCE.apply(normalize_scaled(q, 1.0 / temperature), F.normalize(k, dim=1))


class _InBatchInfoNCE(torch.autograd.Function):
    """``q`` already scaled to norm 1/τ, ``k`` unit-norm: the logits are plain dot products."""

    @staticmethod
    def forward(ctx: FunctionCtx, q: Tensor, k: Tensor) -> Tensor:
        positive = (q * k).sum(dim=1)
        p = q @ k.T
        m = p.amax(dim=1)
        p.sub_(m.unsqueeze(1)).exp_()
        total = p.sum(dim=1)
        p.div_(total.unsqueeze(1))
        ctx.save_for_backward(q, k, p)
        return (m + total.log() - positive).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        q, k, p = ctx.saved_tensors  # type: ignore[attr-defined]
        with autocast_disabled(q):
            scale = grad / q.shape[0]
            # d loss / d logits = (softmax - I) / N: the identity's part is the -k (and -q) term.
            needs = ctx.needs_input_grad  # type: ignore[attr-defined]
            grad_q = torch.mm(p, k).sub_(k).mul_(scale) if needs[0] else None
            grad_k = torch.mm(p.T, q).sub_(q).mul_(scale) if needs[1] else None
            return grad_q, grad_k


def _inputs(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> LossInputs:
    return pair_inputs(p, device, dtype, gen, temperature=0.5)


SPEC = LossSpec(
    NAME,
    inbatch_infonce,
    _inputs,
    min_batch=2,
    min_batch_why="the other images of the batch are the negatives",
    shapes=BenchShapes(
        grid(B=[1024], D=[256]), grid(B=[256, 1024, 4096], D=[256]), grid(B=[256, 1024, 4096], D=[256])
    ),
    batch_key="B",
    scale_invariant=(0, 1),
    temperature_kw=("temperature",),
)
SPECS = (SPEC,)
