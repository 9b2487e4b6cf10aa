"""The ceiling of every comparison: the same encoder trained with labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.distributed import gather
from harness.methods.base import Method, encode_views
from harness.spec import MethodSpec, TrialConfig

SPEC = MethodSpec(
    name="supervised",
    paper="cross-entropy training of the encoder and a linear classifier on the labels",
    knobs={"supervised_views": ...},
    colour="#222222",
    uses_labels=True,
    baseline=True,
)


class Supervised(Method):
    """Cross-entropy of a linear classifier on the backbone, over both augmented views of each
    image: the same backbone, images, views and optimizer steps as the self-supervised methods
    (the supervised baseline of Chen et al. 2020, sec. 6, with their augmentation); with
    ``supervised_views: 1`` over the first view only, standard supervised training.
    ``embed`` gives the backbone features. State: the classifier ``(num_classes, feature_dim)``."""

    spec = SPEC

    def __init__(self, config: TrialConfig, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__(config, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    @property
    def n_views(self) -> int:
        return self.config.supervised_views

    def _logits(self, x: Tensor) -> Tensor:
        return self.classifier(self.backbone(x))

    def training_loss(self, views: list[Tensor], labels: Tensor) -> Tensor:
        logits = list(gather(*encode_views(self._logits, views[: self.n_views])))  # (N, num_classes) each
        (labels,) = gather(labels)
        return F.cross_entropy(torch.cat(logits), labels.repeat(len(logits)))
