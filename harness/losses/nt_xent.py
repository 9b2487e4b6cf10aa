"""NT-Xent, the SimCLR objective.

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations" (ICML),
equation (1): for 2N anchors (both views of N images), the positive of anchor ``i`` is the other view
of the same image and the 2N - 2 other embeddings are its negatives; the self-similarity is excluded
from the denominator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.losses._common import (
    autocast_off,
    check_positive,
    checked_inputs,
    normalize_scaled,
)
from harness.losses._lse import self_excluded_lse
from harness.losses.declaration import (
    BenchShapes,
    LossInputs,
    LossSpec,
    Params,
    grid,
    pair_inputs,
)

NAME = "nt_xent"
NT_XENT_IMPLS: tuple[str, ...] = ("reference", "fast", "chunked")


@autocast_off
def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: float = 0.5,
    *,
    impl: str = "fast",
    chunk_size: int | None = None,
) -> Tensor:
    """SimCLR's normalized temperature-scaled cross-entropy, averaged over the 2N anchors.

    Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations".

    Args:
        z1, z2: ``(N, D)`` projections of the two views; row ``i`` of both comes from image ``i``.
            Not assumed normalized (cosine similarity is used). N ≥ 2.
        temperature: τ > 0 dividing the cosine similarities.
        impl: ``"reference"`` (the formula as written: the ``(2N, 2N)`` similarity matrix, the
            self-similarity masked, a log-sum-exp per row), ``"fast"`` (τ folded into the normalized
            embeddings, a custom autograd function that keeps only the softmax ``(2N, 2N)``; row
            blocks when that matrix would exceed 2²⁸ entries) or ``"chunked"`` (row blocks of
            ``chunk_size`` anchors: extra memory ``O(N · chunk_size)`` instead of ``O(N²)``).
        chunk_size: rows per block of the chunked path (``"fast"`` with a ``chunk_size`` uses it);
            default about 2²¹ / 2N.

    Returns:
        A scalar: ``mean_i [ log Σ_{j≠i} exp(s_ij / τ) - s_{i,p(i)} / τ ]`` with ``s`` the cosine
        similarities of the ``(2N, D)`` stack ``[z1; z2]`` and ``p(i) = (i + N) mod 2N``. float32 for
        16-bit inputs, else the input dtype.
    """
    check_positive(NAME, "temperature", temperature)
    z1, z2 = checked_inputs(
        NAME,
        impl,
        min_batch=SPEC.min_batch,
        why=SPEC.min_batch_why,
        allowed=NT_XENT_IMPLS,
        z1=z1,
        z2=z2,
    )
    if impl == "reference":
        return _reference(z1, z2, temperature)
    chunked = True if impl == "chunked" else None
    return _fast(z1, z2, temperature, chunk_size=chunk_size, chunked=chunked)


def _reference(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    anchors = torch.arange(2 * n, device=z.device)
    positives = sim[anchors, (anchors + n) % (2 * n)]
    return (torch.logsumexp(sim, dim=1) - positives).mean()


def _fast(
    z1: Tensor, z2: Tensor, temperature: float, *, chunk_size: int | None, chunked: bool | None
) -> Tensor:
    n = z1.shape[0]
    # With z scaled to norm τ^{-1/2}, z zᵀ is already s / τ: no (2N, 2N) division pass.
    z = normalize_scaled(torch.cat([z1, z2], dim=0), temperature**-0.5)
    lse = self_excluded_lse(z, chunk_size=chunk_size, chunked=chunked)
    # Anchor i and anchor i + N share one positive logit, so the 2N positives are N dot products.
    positives = (z[:n] * z[n:]).sum(dim=1)
    return lse.mean() - positives.mean()


def _inputs(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> LossInputs:
    return pair_inputs(p, device, dtype, gen, temperature=0.5)


SPEC = LossSpec(
    NAME,
    nt_xent,
    _inputs,
    min_batch=2,
    min_batch_why="with one pair an anchor's only candidate is its positive",
    shapes=BenchShapes(
        grid(B=[1024], D=[128]), grid(B=[256, 1024, 4096], D=[128]), grid(B=[256, 1024, 4096], D=[128])
    ),
    impls=NT_XENT_IMPLS,
    batch_key="B",
    symmetric=True,
    scale_invariant=(0, 1),
    temperature_kw=("temperature",),
)
SPECS = (SPEC,)
