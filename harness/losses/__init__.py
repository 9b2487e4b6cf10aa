"""The loss functions of DESIGN.md's loss table, each with a ``reference`` and a ``fast`` implementation.

Pure functions of tensors: ``from harness.losses import nt_xent`` and call
``nt_xent(z1, z2, temperature, impl="fast")``. Every function returns a scalar, accepts any float
dtype and device, and normalizes by itself where it uses cosine similarity. docs/LOSSES.md gives the
formulas and the measurements behind each fast implementation.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from harness.losses import barlow_twins as _barlow_twins
from harness.losses import byol as _byol
from harness.losses import dino as _dino
from harness.losses import geometry as _geometry
from harness.losses import inbatch_infonce as _inbatch_infonce
from harness.losses import infonce as _infonce
from harness.losses import metric as _metric
from harness.losses import nt_xent as _nt_xent
from harness.losses import supcon as _supcon
from harness.losses import swav as _swav
from harness.losses import vicreg as _vicreg
from harness.losses._common import IMPLS
from harness.losses.barlow_twins import barlow_twins
from harness.losses.byol import byol
from harness.losses.declaration import LossInputs, LossSpec
from harness.losses.dino import dino, dino_multicrop
from harness.losses.geometry import alignment, uniformity
from harness.losses.inbatch_infonce import inbatch_infonce
from harness.losses.infonce import infonce
from harness.losses.metric import npair, triplet
from harness.losses.nt_xent import NT_XENT_IMPLS, nt_xent
from harness.losses.supcon import supcon
from harness.losses.swav import sinkhorn, swav, swav_multicrop
from harness.losses.vicreg import vicreg

# Every declared loss and benchmarked kernel, in the benchmark's order. Adding a loss: its file
# (with its SPECS) and one entry here.
LOSS_SPECS: dict[str, LossSpec] = {
    spec.name: spec
    for module in (
        _nt_xent,
        _infonce,
        _inbatch_infonce,
        _byol,
        _barlow_twins,
        _vicreg,
        _swav,
        _dino,
        _supcon,
        _metric,
        _geometry,
    )
    for spec in module.SPECS
}

LOSSES: dict[str, Callable[..., Tensor]] = {name: spec.fn for name, spec in LOSS_SPECS.items() if spec.loss}

__all__ = [
    "IMPLS",
    "LOSSES",
    "LOSS_SPECS",
    "NT_XENT_IMPLS",
    "LossInputs",
    "LossSpec",
    "alignment",
    "barlow_twins",
    "byol",
    "dino",
    "dino_multicrop",
    "inbatch_infonce",
    "infonce",
    "npair",
    "nt_xent",
    "sinkhorn",
    "supcon",
    "swav",
    "swav_multicrop",
    "triplet",
    "uniformity",
    "vicreg",
]
