"""The loss functions of DESIGN.md's loss table, each with a ``reference`` and a ``fast`` implementation.

Pure functions of tensors: ``from harness.losses import nt_xent`` and call
``nt_xent(z1, z2, temperature, impl="fast")``. Every function returns a scalar, accepts any float
dtype and device, and normalizes by itself where it uses cosine similarity. docs/LOSSES.md gives the
formulas and the measurements behind each fast implementation.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from harness.losses._common import IMPLS
from harness.losses.barlow_twins import barlow_twins
from harness.losses.byol import byol
from harness.losses.dino import dino
from harness.losses.geometry import alignment, uniformity
from harness.losses.inbatch_infonce import inbatch_infonce
from harness.losses.infonce import infonce
from harness.losses.metric import npair, triplet
from harness.losses.nt_xent import NT_XENT_IMPLS, nt_xent
from harness.losses.supcon import supcon
from harness.losses.swav import sinkhorn, swav
from harness.losses.vicreg import vicreg

LOSSES: dict[str, Callable[..., Tensor]] = {
    "nt_xent": nt_xent,
    "infonce": infonce,
    "inbatch_infonce": inbatch_infonce,
    "byol": byol,
    "barlow_twins": barlow_twins,
    "vicreg": vicreg,
    "swav": swav,
    "dino": dino,
    "supcon": supcon,
    "triplet": triplet,
    "npair": npair,
    "alignment": alignment,
    "uniformity": uniformity,
}

__all__ = [
    "IMPLS",
    "LOSSES",
    "NT_XENT_IMPLS",
    "alignment",
    "barlow_twins",
    "byol",
    "dino",
    "inbatch_infonce",
    "infonce",
    "npair",
    "nt_xent",
    "sinkhorn",
    "supcon",
    "swav",
    "triplet",
    "uniformity",
    "vicreg",
]
