"""Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction")."""

from __future__ import annotations

from torch import Tensor

from harness.distributed import gather
from harness.losses import barlow_twins
from harness.methods.base import Method, encode_views, fp32_loss, mlp
from harness.spec import MethodSpec, TrialConfig

SPEC = MethodSpec(
    name="barlow_twins",
    paper="Zbontar et al. 2021, Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
    knobs={"barlow_lambda": 5e-3, "proj_hidden_dim": 2048, "proj_dim": 2048},
    cite="lambda 5e-3; projector 8192-8192 on ImageNet, 2048 on CIFAR (solo-learn)",
    colour="#9467bd",
)


class BarlowTwins(Method):
    """The cross-correlation matrix of the two views' batch-standardized projections is driven to
    the identity: invariance on the diagonal, redundancy reduction off it, weighted by
    ``barlow_lambda`` (Zbontar et al. 2021, eq. 1).

    The projector is the paper's 3-layer MLP (Linear-BN-ReLU twice, then Linear); the views are
    BYOL's asymmetric augmentations, which the paper trains with. State: none beyond the projector.
    Knobs: ``barlow_lambda``, ``proj_hidden_dim``, ``proj_dim``.
    """

    spec = SPEC
    recipe = "byol"

    def __init__(self, config: TrialConfig, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__(config, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        hidden = config.proj_hidden_dim
        self.projector = mlp([self.feature_dim, hidden, hidden, config.proj_dim])

    def embed(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))

    def training_loss(self, views: list[Tensor], labels: Tensor) -> Tensor:
        # The cross-correlation of the global batch on several processes.
        z1, z2 = gather(*encode_views(self.embed, views[:2]))  # (N, proj_dim) each
        with fp32_loss(z1):
            return barlow_twins(z1, z2, lambd=self.config.barlow_lambda, impl=self.config.loss_impl)
