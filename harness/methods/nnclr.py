"""NNCLR (Dwibedi et al. 2021, "With a Little Help from My Friends: Nearest-Neighbor Contrastive
Learning of Visual Representations")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.losses import inbatch_infonce
from harness.methods.base import Method, encode_views, fp32_loss, mlp
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
        index = (F.normalize(z.float(), dim=1) @ self.support.T).argmax(dim=1)
        return self.support[index]

    def training_loss(self, views: list[Tensor], labels: Tensor) -> Tensor:
        z1, z2 = encode_views(self.embed, views[:2])  # (N, proj_dim) each
        p1, p2 = self.predictor(z1), self.predictor(z2)
        # The neighbours come from the support set before this batch enters it; no gradient flows
        # through them (Dwibedi et al. 2021, sec. 3.1).
        nn1, nn2 = self.nearest_neighbours(z1), self.nearest_neighbours(z2)
        tau, impl = self.config.temperature, self.config.loss_impl
        with fp32_loss(p1):
            loss = (inbatch_infonce(nn1, p2, tau, impl=impl) + inbatch_infonce(nn2, p1, tau, impl=impl)) / 2
        self._enqueue(F.normalize(z1.detach().float(), dim=1))
        return loss

    @torch.no_grad()
    def _enqueue(self, rows: Tensor) -> None:
        """Write ``rows`` ``(M, D)`` at ``support_ptr``, wrapping around; out of place, since this
        step's loss still refers to the old support set."""
        size = self.support.shape[0]
        rows = rows[-size:].to(self.support.dtype)
        index = (self.support_ptr + torch.arange(rows.shape[0], device=rows.device)) % size
        self.support = self.support.index_copy(0, index, rows)
        self.support_ptr = (self.support_ptr + rows.shape[0]) % size
