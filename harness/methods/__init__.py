"""Self-supervised methods and the two baselines, by name (``harness.spec.METHOD_NAMES``).

Each method is one file holding one ``Method`` subclass (see ``base.py`` for the interface);
adding a method is that file plus one line in ``METHODS``.
"""

from __future__ import annotations

from harness.methods.barlow_twins import BarlowTwins
from harness.methods.base import Method
from harness.methods.byol import BYOL
from harness.methods.dino import DINO
from harness.methods.moco import MoCo
from harness.methods.random_init import RandomInit
from harness.methods.simclr import SimCLR
from harness.methods.simsiam import SimSiam
from harness.methods.supcon import SupCon
from harness.methods.supervised import Supervised
from harness.methods.swav import SwAV
from harness.methods.vicreg import VICReg

METHODS: dict[str, type[Method]] = {
    "simclr": SimCLR,
    "moco": MoCo,
    "byol": BYOL,
    "simsiam": SimSiam,
    "barlow_twins": BarlowTwins,
    "vicreg": VICReg,
    "swav": SwAV,
    "dino": DINO,
    "supcon": SupCon,
    "random_init": RandomInit,
    "supervised": Supervised,
}

__all__ = ["METHODS", "Method"]
