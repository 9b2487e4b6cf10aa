"""MoCo v3 (Chen, Xie and He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from harness.distributed import gather
from harness.losses import inbatch_infonce
from harness.methods.base import Method, encode_views, fp32_loss, frozen_copy, mlp
from harness.spec import MethodSpec, TrialConfig

SPEC = MethodSpec(
    name="mocov3",
    paper="Chen, Xie and He 2021, An Empirical Study of Training Self-Supervised Vision Transformers (MoCo v3)",
    knobs={"temperature": 1.0, "momentum": 0.99, "proj_hidden_dim": 1024, "proj_dim": 256, "pred_hidden_dim": 1024},
    cite="ResNet recipe of the official main_moco.py: temperature 1.0, momentum 0.99 with a cosine "
    "increase to 1, 2-layer projector and predictor 4096-256 (scaled down to 1024-256 like BYOL's)",
    colour="#ad494a",
)


class MoCoV3(Method):
    """A query encoder (backbone, projector, predictor) and a momentum key encoder (EMA of the
    backbone and projector); no queue: the keys of the other images of the batch are the negatives.
    The loss is symmetric, ``ctr(q1, k2) + ctr(q2, k1)``, each ``ctr`` the in-batch InfoNCE times
    ``2τ`` (Chen, Xie and He 2021, Algorithm 1).

    Projector: Linear-BN-ReLU-Linear-BN (the last BN without affine parameters); predictor:
    Linear-BN-ReLU-Linear (the ResNet heads of the official code). The key momentum follows the
    cosine schedule from ``momentum`` to 1 over the run, as in the official code.

    State: ``key_backbone``/``key_projector`` (EMA, updated after each optimizer step).
    Knobs: ``temperature``, ``momentum``, ``proj_hidden_dim``, ``proj_dim``, ``pred_hidden_dim``.
    """

    spec = SPEC
    recipe = "byol"

    def __init__(self, config: TrialConfig, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__(config, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        self.projector = mlp([self.feature_dim, config.proj_hidden_dim, config.proj_dim], last_batch_norm=True)
        self.predictor = mlp([config.proj_dim, config.pred_hidden_dim, config.proj_dim])
        self.key_backbone = frozen_copy(self.backbone)
        self.key_projector = frozen_copy(self.projector)

    def embed(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))

    def _keys(self, x: Tensor) -> Tensor:
        return self.key_projector(self.key_backbone(x))

    def training_loss(self, views: list[Tensor], labels: Tensor) -> Tensor:
        q1, q2 = (self.predictor(z) for z in encode_views(self.embed, views[:2]))  # (N, proj_dim)
        with torch.no_grad():
            k1, k2 = encode_views(self._keys, views[:2])
        q1, q2, k1, k2 = gather(q1, q2, k1, k2)  # in-batch negatives of the global batch
        tau, impl = self.config.temperature, self.config.loss_impl
        with fp32_loss(q1):
            # Algorithm 1: ctr(q, k) = CrossEntropyLoss(q kᵀ / τ, arange(N)) * 2τ.
            return 2 * tau * (inbatch_infonce(q1, k2, tau, impl=impl) + inbatch_infonce(q2, k1, tau, impl=impl))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.key_backbone, self.backbone), (self.key_projector, self.projector)]

    def target_momentum(self, step: int) -> float:
        return self.cosine_momentum(self.config.momentum, step)
