"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from harness.distributed import gather
from harness.losses import byol
from harness.methods.base import Method, encode_views, fp32_loss, frozen_copy, mlp
from harness.spec import MethodSpec, TrialConfig

SPEC = MethodSpec(
    name="byol",
    paper="Grill et al. 2020, Bootstrap Your Own Latent",
    knobs={"momentum": 0.996, "proj_hidden_dim": 1024, "proj_dim": 256, "pred_hidden_dim": 1024},
    cite="tau_base 0.996 with a cosine schedule to 1; projector/predictor 4096-256, scaled down to "
    "1024-256 for small encoders",
    colour="#2ca02c",
)


class BYOL(Method):
    """An online network (backbone, projector, predictor) regresses the projection of the other
    view made by a target network, the EMA of the online backbone and projector; the loss is
    symmetrized over the two views (Grill et al. 2020, sec. 3.1, eq. 2).

    Projector and predictor are Linear-BN-ReLU-Linear MLPs. The target momentum follows the cosine
    schedule ``1 - (1 - momentum) (cos(pi k / K) + 1) / 2`` from ``momentum`` to 1 over the run.

    State: ``target_backbone``/``target_projector`` (EMA, updated after each optimizer step).
    Knobs: ``momentum`` (the base tau), ``proj_hidden_dim``, ``proj_dim``, ``pred_hidden_dim``.
    """

    spec = SPEC
    recipe = "byol"

    def __init__(self, config: TrialConfig, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__(config, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        self.projector = mlp([self.feature_dim, config.proj_hidden_dim, config.proj_dim])
        self.predictor = mlp([config.proj_dim, config.pred_hidden_dim, config.proj_dim])
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)

    def embed(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))

    def _target(self, x: Tensor) -> Tensor:
        return self.target_projector(self.target_backbone(x))

    def training_loss(self, views: list[Tensor], labels: Tensor) -> Tensor:
        p1, p2 = (self.predictor(z) for z in encode_views(self.embed, views[:2]))  # (N, proj_dim)
        with torch.no_grad():
            t1, t2 = encode_views(self._target, views[:2])
        p1, p2, t1, t2 = gather(p1, p2, t1, t2)
        impl = self.config.loss_impl
        # Grill et al. 2020, eq. 2: the sum of the two directions.
        with fp32_loss(p1):
            return byol(p1, t2, impl=impl) + byol(p2, t1, impl=impl)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.target_backbone, self.backbone), (self.target_projector, self.projector)]

    def target_momentum(self, step: int) -> float:
        return self.cosine_momentum(self.config.momentum, step)
