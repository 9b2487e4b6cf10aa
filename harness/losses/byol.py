"""BYOL's regression loss (also SimSiam's negative cosine, up to the constant).

Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning"
(NeurIPS), equation (2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.losses._common import (
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
    randn,
)

NAME = "byol"


@autocast_off
def byol(p: Tensor, z: Tensor, *, impl: str = "fast") -> Tensor:
    """Mean of ``‖p̂ - ẑ‖² = 2 - 2 cos(p, z)`` over the batch.

    Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning".
    One direction only: the method symmetrizes (swaps the views) and detaches the target ``z``.

    Args:
        p: ``(N, D)`` online predictions.
        z: ``(N, D)`` target projections (gradients flow into it unless the caller detaches it).
        impl: ``"reference"`` (normalize both, subtract the row dot products from 2) or ``"fast"``
            (the row dot product divided by the product of the norms: no normalized copies).

    Returns:
        A scalar in ``[0, 4]``; float32 for 16-bit inputs, else the input dtype.
    """
    p, z = checked_inputs(NAME, impl, min_batch=SPEC.min_batch, why=SPEC.min_batch_why, p=p, z=z)
    if impl == "reference":
        p = F.normalize(p, dim=1)
        z = F.normalize(z, dim=1)
        return (2 - 2 * (p * z).sum(dim=1)).mean()
    eps = 1e-12
    norms = torch.linalg.vector_norm(p, dim=1).clamp_min(eps) * torch.linalg.vector_norm(z, dim=1).clamp_min(
        eps
    )
    return 2 - 2 * ((p * z).sum(dim=1) / norms).mean()


def _inputs(p: Params, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> LossInputs:
    prediction = leaf(randn((p["N"], p["D"]), device, dtype, gen))
    target = randn((p["N"], p["D"]), device, dtype, gen)  # the target branch is detached
    return LossInputs((prediction, target), {}, (prediction,))


SPEC = LossSpec(
    NAME,
    byol,
    _inputs,
    min_batch=1,
    min_batch_why="an empty batch has no mean",
    shapes=BenchShapes(grid(N=[4096], D=[256]), grid(N=[256, 4096], D=[256]), grid(N=[256, 4096], D=[256])),
    symmetric=True,
    scale_invariant=(0, 1),
)
SPECS = (SPEC,)
