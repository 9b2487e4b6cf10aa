"""NNCLR (Dwibedi et al. 2021, "With a Little Help from My Friends: Nearest-Neighbor Contrastive
Learning of Visual Representations")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.distributed import gather
from harness.losses import inbatch_infonce
from harness.methods.base import Method, encode_views, fp32_loss, mlp, ring_write
from harness.spec import MethodSpec, Rule, TrialConfig

SPEC = MethodSpec(
    name="nnclr",
    paper="Dwibedi et al. 2021, With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning",
    knobs={"temperature": 0.1, "queue_size": 4096, "proj_hidden_dim": 1024, "proj_dim": 256, "pred_hidden_dim": 1024},
    cite="temperature 0.1; projector 2048-256 and predictor 4096-256 (scaled down to 1024-256 like "
    "BYOL's); support set 98,304 on ImageNet, 4096 at this scale (MoCo's CIFAR queue)",
    colour="#393b79",
    rules=(Rule("queue_size", lambda c: c.queue_size >= c.batch_size, "queue_size >= batch_size", ("batch_size",)),),
)


class NNCLR(Method):
    """Backbone, projector and predictor; the positive of each view is the nearest neighbour of its
    projection in a support set of projections from earlier batches, contrasted with the other
    view's prediction against the rest of the batch (Dwibedi et al. 2021, eq. 2), symmetrized.

    State: ``support`` ``(queue_size, proj_dim)`` of unit-norm projections of the first view,
    oldest overwritten first (a ring buffer, like MoCo's queue; random unit vectors at the start,
    replaced within ``queue_size / batch_size`` steps), and ``support_ptr``.
    Knobs: ``temperature``, ``queue_size`` (the support set), ``proj_hidden_dim``, ``proj_dim``,
    ``pred_hidden_dim``.
    """

    spec = SPEC
    recipe = "byol"

    support: Tensor
    support_ptr: Tensor

    def __init__(self, config: TrialConfig, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__(config, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        if config.queue_size < 1:
            raise ValueError(f"nnclr needs a support set, queue_size >= 1, got {config.queue_size}")
        self.projector = mlp([self.feature_dim, config.proj_hidden_dim, config.proj_dim])
        self.predictor = mlp([config.proj_dim, config.pred_hidden_dim, config.proj_dim])
        self.register_buffer("support", F.normalize(torch.randn(config.queue_size, config.proj_dim), dim=1))
        self.register_buffer("support_ptr", torch.zeros((), dtype=torch.long))

    def embed(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))

    @torch.no_grad()
    def nearest_neighbours(self, z: Tensor) -> Tensor:
        """The support-set row closest (cosine) to each row of ``z`` ``(N, D)``: ``(N, D)``."""
        index = (F.normalize(z.to(self.support.dtype), dim=1) @ self.support.T).argmax(dim=1)
        return self.support[index]

    def training_loss(self, views: list[Tensor], labels: Tensor) -> Tensor:
        z1, z2 = encode_views(self.embed, views[:2])  # (N, proj_dim) each
        p1, p2 = self.predictor(z1), self.predictor(z2)
        z1, z2, p1, p2 = gather(z1, z2, p1, p2)  # support set and negatives of the global batch
        # The neighbours come from the support set before this batch enters it; no gradient flows
        # through them (Dwibedi et al. 2021, sec. 3.1).
        nn1, nn2 = self.nearest_neighbours(z1), self.nearest_neighbours(z2)
        tau, impl = self.config.temperature, self.config.loss_impl
        with fp32_loss(p1):
            loss = (inbatch_infonce(nn1, p2, tau, impl=impl) + inbatch_infonce(nn2, p1, tau, impl=impl)) / 2
        new_rows = F.normalize(z1.detach().to(self.support.dtype), dim=1)
        self.support, self.support_ptr = ring_write(self.support, self.support_ptr, new_rows)
        return loss
