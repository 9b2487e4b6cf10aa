"""Supervised contrastive loss (L_out).

Khosla et al. 2020, "Supervised Contrastive Learning" (NeurIPS), equation (2): every other view of
every sample with the same label is a positive of the anchor; all V·N - 1 others form the
denominator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.losses._common import (
    autocast_off,
    check_impl,
    check_matrix,
    check_positive,
    compute_dtype,
    normalize_scaled,
    upcast,
)
from harness.losses._lse import self_excluded_lse
from harness.losses.declaration import (
    BenchShapes,
    LossInputs,
    LossSpec,
    Params,
    grid,
    leaf,
    randn,
)

NAME = "supcon"


@autocast_off
def supcon(z: Tensor, labels: Tensor, temperature: float = 0.1, *, impl: str = "fast") -> Tensor:
    """``mean_i -1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) )``.

    Khosla et al. 2020, "Supervised Contrastive Learning", L_out (the mean over positives outside
    the log), without the official code's ``τ / base_τ`` rescaling.

    Args:
        z: ``(N, V, D)``: V views of N samples (normalized inside). The V·N anchors are the views
            stacked view-major, as in the official code.
        labels: ``(N,)`` integer class labels.
        temperature: τ > 0.
        impl: ``"reference"`` (the ``(VN, VN)`` logits, the self-similarity masked, log-softmax, the
            positive mask ``labels_i == labels_j, i ≠ j`` materialized) or ``"fast"`` (the
            log-sum-exp by the custom function of the fast NT-Xent; the positive sum
            ``Σ_p z_i·z_p = z_i · (Σ_{class(i)} z) - ‖z_i‖²`` from per-class sums of the embeddings,
            so no ``(VN, VN)`` mask is built).

    Returns:
        A scalar: the mean over the anchors that have at least one positive (with V ≥ 2 all of
        them; with V = 1, a sample alone in its class has none and is left out). ValueError when
        no anchor has a positive.
    """
    check_impl(NAME, impl)
    check_matrix(NAME, "z", z, ndim=3)
    n, v, _ = z.shape
    if labels.shape != (n,):
        raise ValueError(f"{NAME}: labels must have shape ({n},), got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"{NAME}: labels must be integers, got {labels.dtype}")
    if n * v < 2:
        raise ValueError(
            f"{NAME}: batch of {n} sample(s) × {v} view(s) is too small, need at least 2 embeddings"
        )
    check_positive(NAME, "temperature", temperature)
    z = upcast(z, compute_dtype(z))
    labels = labels.to(z.device)
    if impl == "reference":
        return _reference(z, labels, temperature)
    return _fast(z, labels, temperature)


def _no_positive_error() -> ValueError:
    return ValueError(
        f"{NAME}: no anchor has a positive (one view per sample and no two samples share a label)"
    )


def _reference(z: Tensor, labels: Tensor, temperature: float) -> Tensor:
    n, v, _ = z.shape
    features = F.normalize(z, dim=2)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)  # (V·N, D), view-major
    anchor_labels = labels.repeat(v)
    logits = contrast @ contrast.T / temperature
    self_mask = torch.eye(n * v, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive_mask = (anchor_labels.unsqueeze(0) == anchor_labels.unsqueeze(1)) & ~self_mask
    positive_count = positive_mask.sum(dim=1)
    has_positive = positive_count > 0
    if v == 1 and not bool(has_positive.any()):
        raise _no_positive_error()
    mean_log_prob_pos = log_prob.masked_fill(~positive_mask, 0.0).sum(dim=1) / positive_count.clamp_min(1)
    return -mean_log_prob_pos[has_positive].mean()


def _fast(z: Tensor, labels: Tensor, temperature: float) -> Tensor:
    n, v, d = z.shape
    contrast = normalize_scaled(z.transpose(0, 1).reshape(n * v, d), temperature**-0.5)
    uniques, classes = torch.unique(labels, return_inverse=True)
    classes = classes.repeat(v)
    class_sums = contrast.new_zeros(uniques.numel(), d).index_add(0, classes, contrast)
    positive_count = torch.bincount(classes, minlength=uniques.numel())[classes] - 1
    # Σ_{p∈P(i)} z_i·z_p: the anchor's class sum minus itself.
    positive_sum = (contrast * class_sums[classes]).sum(dim=1) - contrast.pow(2).sum(dim=1)
    lse = self_excluded_lse(contrast)
    per_anchor = lse - positive_sum / positive_count.clamp_min(1)
    if v >= 2:
        return per_anchor.mean()
    has_positive = positive_count > 0
    if not bool(has_positive.any()):
        raise _no_positive_error()
    return per_anchor[has_positive].mean()


def _inputs(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> LossInputs:
    z = leaf(randn((p["N"], p["V"], p["D"]), device, dtype, gen))
    labels = torch.randint(0, p["C"], (p["N"],), generator=gen).to(device)
    return LossInputs((z, labels), {"temperature": 0.1}, (z,))


SPEC = LossSpec(
    NAME,
    supcon,
    _inputs,
    min_batch=1,
    min_batch_why="at least 2 embeddings (samples × views)",
    shapes=BenchShapes(
        grid(N=[256], V=[2], D=[128], C=[10]),
        grid(N=[256, 1024], V=[2], D=[128], C=[10]),
        grid(N=[256, 1024, 2048], V=[2], D=[128], C=[10]),
    ),
    test_params={"V": 2, "C": 3},
    scale_invariant=(0,),
    temperature_kw=("temperature",),
)
SPECS = (SPEC,)
