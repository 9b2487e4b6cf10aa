"""MoCo v2 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning";
Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.distributed import gather
from harness.losses import infonce
from harness.methods.base import Method, encode_views, fp32_loss, frozen_copy, mlp, ring_write
from harness.spec import MethodSpec, Rule, TrialConfig

SPEC = MethodSpec(
    name="moco",
    paper="He et al. 2020, Momentum Contrast; Chen et al. 2020, Improved Baselines with Momentum Contrastive Learning (v2)",
    knobs={
        "temperature": 0.2,
        "queue_size": 4096,
        "momentum": 0.99,
        "proj_hidden_dim": 512,
        "proj_dim": 128,
        "moco_symmetric": ...,
    },
    cite="MoCo v2: temperature 0.2, MLP head 2048-128, key momentum 0.999 on ImageNet; 0.99 and a "
    "4096-key queue are the usual CIFAR settings (solo-learn)",
    colour="#ff7f0e",
    rules=(Rule("queue_size", lambda c: c.queue_size >= c.batch_size, "queue_size >= batch_size", ("batch_size",)),),
)


class MoCo(Method):
    """A query encoder (backbone + MLP head) trained with InfoNCE against the key of the other view,
    made by a momentum copy of the query encoder, and ``queue_size`` keys of earlier batches as the
    negatives (He et al. 2020, Algorithm 1; the MLP head and temperature of MoCo v2).

    With ``moco_symmetric`` both views serve as queries, the loss is the mean of the two directions
    and both key sets are enqueued (the symmetric loss of the MoCo authors' CIFAR-10 demo).

    The MLP head is Linear-ReLU-Linear without BN, as in MoCo v2; the backbone's BN sees the keys'
    batch as a whole (no Shuffle-BN: that needs several devices, and the harness trains on one).

    State: ``key_backbone``/``key_projector`` (EMA of the query encoder with constant ``momentum``,
    updated after each optimizer step), ``queue`` ``(queue_size, proj_dim)`` of unit-norm keys,
    oldest overwritten first, and ``queue_ptr`` (the next row to write).
    Knobs: ``temperature``, ``queue_size``, ``momentum``, ``proj_hidden_dim``, ``proj_dim``,
    ``moco_symmetric``.
    """

    spec = SPEC

    queue: Tensor
    queue_ptr: Tensor

    def __init__(self, config: TrialConfig, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__(config, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        if config.queue_size < 1:
            raise ValueError(f"moco needs queue_size >= 1, got {config.queue_size}")
        self.projector = mlp([self.feature_dim, config.proj_hidden_dim, config.proj_dim], batch_norm=False)
        self.key_backbone = frozen_copy(self.backbone)
        self.key_projector = frozen_copy(self.projector)
        # He et al. 2020 start from random unit-norm keys; they are overwritten within
        # queue_size / batch_size steps.
        self.register_buffer("queue", F.normalize(torch.randn(config.queue_size, config.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def embed(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))

    def _keys(self, x: Tensor) -> Tensor:
        return self.key_projector(self.key_backbone(x))

    def training_loss(self, views: list[Tensor], labels: Tensor) -> Tensor:
        symmetric = self.config.moco_symmetric
        queries = encode_views(self.embed, views[:2] if symmetric else views[:1])  # (N, proj_dim) each
        with torch.no_grad():
            keys = [
                F.normalize(k, dim=1)
                for k in encode_views(self._keys, views[1::-1] if symmetric else views[1:2])
            ]
        queries, keys = list(gather(*queries)), list(gather(*keys))  # the global batch
        # The negatives are the queue before this batch's keys enter it (He et al. 2020, Alg. 1).
        kwargs = {"temperature": self.config.temperature, "impl": self.config.loss_impl}
        with fp32_loss(self.queue):
            losses = [infonce(q, k, self.queue, **kwargs) for q, k in zip(queries, keys)]
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        self.queue, self.queue_ptr = ring_write(self.queue, self.queue_ptr, torch.cat(keys))
        return loss

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """The key encoder follows the query encoder with constant momentum (He et al. 2020, eq. 2)."""
        return [(self.key_backbone, self.backbone), (self.key_projector, self.projector)]
