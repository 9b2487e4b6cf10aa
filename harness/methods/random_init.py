"""The floor of every comparison: the encoder at its random initialization."""

from __future__ import annotations

from torch import Tensor

from harness.methods.base import Method


class RandomInit(Method):
    """The backbone as initialized (seeded by ``seed``), evaluated like every trained method
    (e.g. Caron et al. 2021, Table 4's "random weights" row). Not trained: the training loop skips
    methods with ``trainable = False``. ``embed`` gives the backbone features. State: none."""

    name = "random_init"
    trainable = False

    def training_loss(self, views: list[Tensor], labels: Tensor) -> Tensor:
        raise RuntimeError(
            "random_init is not trained; the training loop skips methods with trainable = False"
        )
