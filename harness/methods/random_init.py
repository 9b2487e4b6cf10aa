"""The floor of every comparison: the encoder at its random initialization."""

from __future__ import annotations

from torch import Tensor

from harness.methods.base import Method
from harness.spec import MethodSpec

SPEC = MethodSpec(
    name="random_init",
    paper="the encoder at its random initialization (e.g. Caron et al. 2021, Table 4)",
    knobs={"random_init_recompute_bn": ...},
    colour="#9a9a9a",
    trains=False,
    baseline=True,
)


class RandomInit(Method):
    """The backbone as initialized (seeded by ``seed``), evaluated like every trained method
    (e.g. Caron et al. 2021, Table 4's "random weights" row). Not trained: the training loop skips
    methods with ``trainable = False``. ``embed`` gives the backbone features. State: none.
    Knob: ``random_init_recompute_bn`` (true: the batch norms' running statistics are recomputed
    on the pretraining images before evaluation, the calibrated floor; docs/FINDINGS.md)."""

    spec = SPEC

    def training_loss(self, views: list[Tensor], labels: Tensor) -> Tensor:
        raise RuntimeError(
            "random_init is not trained; the training loop skips methods with trainable = False"
        )
