"""Supervised contrastive learning (Khosla et al. 2020, "Supervised Contrastive Learning")."""

from __future__ import annotations

import torch
from torch import Tensor

from harness.distributed import gather
from harness.losses import supcon
from harness.methods.base import Method, encode_views, fp32_loss, mlp
from harness.spec import MethodSpec, TrialConfig

SPEC = MethodSpec(
    name="supcon",
    paper="Khosla et al. 2020, Supervised Contrastive Learning",
    knobs={"temperature": 0.1, "proj_hidden_dim": 512, "proj_dim": 128},
    cite="temperature 0.1, 128-d projection",
    colour="#17becf",
    uses_labels=True,
)


class SupCon(Method):
    """SimCLR's encoder and projector trained with the labels: every other view of an image of the
    same class is a positive (Khosla et al. 2020, eq. 2, L_out). The supervised-contrastive
    reference for the self-supervised methods.

    The projector is SimCLR's (Linear-BN-ReLU-Linear), so SimCLR and SupCon differ in the loss
    only. State: none beyond the projector. Knobs: ``temperature``, ``proj_hidden_dim``, ``proj_dim``.
    """

    spec = SPEC

    def __init__(self, config: TrialConfig, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__(config, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        self.projector = mlp([self.feature_dim, config.proj_hidden_dim, config.proj_dim])

    def embed(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))

    def training_loss(self, views: list[Tensor], labels: Tensor) -> Tensor:
        # The loss normalizes the projections itself (Khosla et al. 2020, sec. 3.2).
        z = torch.stack(encode_views(self.embed, views[:2]), dim=1)  # (N, 2, proj_dim)
        z, labels = gather(z, labels)  # positives and negatives of the global batch
        with fp32_loss(z):
            return supcon(z, labels, temperature=self.config.temperature, impl=self.config.loss_impl)
