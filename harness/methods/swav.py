"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.distributed import gather
from harness.losses import swav_multicrop
from harness.methods.base import Method, encode_views, fp32_loss, mlp
from harness.spec import MethodSpec, Rule, TrialConfig

# Caron et al. 2020 compute codes from the two global crops only ("crops_for_assign").
N_GLOBAL = 2

SPEC = MethodSpec(
    name="swav",
    paper="Caron et al. 2020, Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
    knobs={
        "temperature": 0.1,
        "queue_size": 0,
        "proj_hidden_dim": 512,
        "proj_dim": 128,
        "local_crops": 2,
        "swav_prototypes": 100,
        "swav_epsilon": 0.05,
        "swav_iterations": 3,
    },
    cite="temperature 0.1, epsilon 0.05, 3 Sinkhorn iterations, 128-d projection; 100 prototypes is "
    "the CIFAR-sized setting; 2 local crops keeps the CPU budget",
    colour="#e377c2",
    rules=(
        Rule(
            "queue_size",
            lambda c: c.queue_size == 0 or c.queue_size >= c.batch_size,
            "0 (no queue) or >= batch_size",
            ("batch_size",),
        ),
    ),
)


class SwAV(Method):
    """Online clustering: each crop's normalized projection is scored against ``swav_prototypes``
    unit-norm prototypes; the codes of each global crop, balanced over the batch by Sinkhorn-Knopp
    (``swav_epsilon``, ``swav_iterations``), are predicted from every other crop, local crops
    included (Caron et al. 2020, eq. 2-3 and sec. 3.1 multi-crop).

    With ``queue_size > 0``, the codes are computed over the batch plus a queue of earlier
    embeddings of each global crop, once the queue is full (Caron et al. 2020, sec. 4.1 "small
    batches" and their code). Not implemented: freezing the prototypes during the first epoch.

    State: ``prototypes`` (a bias-free Linear whose weight rows are re-normalized after each
    optimizer step), ``queue`` ``(2, queue_size, proj_dim)`` when ``queue_size > 0`` and the count
    of embeddings enqueued so far (extra state).
    Knobs: ``temperature``, ``queue_size``, ``local_crops``, ``swav_prototypes``, ``swav_epsilon``,
    ``swav_iterations``, ``proj_hidden_dim``, ``proj_dim``.
    """

    spec = SPEC
    recipe = "multicrop"

    queue: Tensor

    def __init__(self, config: TrialConfig, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__(config, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        self.projector = mlp([self.feature_dim, config.proj_hidden_dim, config.proj_dim])
        self.prototypes = nn.Linear(config.proj_dim, config.swav_prototypes, bias=False)
        self.normalize_prototypes()
        self.queue_count = 0
        if config.queue_size > 0:
            self.register_buffer("queue", torch.zeros(N_GLOBAL, config.queue_size, config.proj_dim))

    @property
    def n_local_crops(self) -> int:
        return self.config.local_crops

    def embed(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))

    @property
    def queue_full(self) -> bool:
        return self.config.queue_size > 0 and self.queue_count >= self.config.queue_size

    def training_loss(self, views: list[Tensor], labels: Tensor) -> Tensor:
        config = self.config
        # Sinkhorn's codes over the global batch on several processes.
        projections = list(gather(*encode_views(self.embed, views)))  # (B, proj_dim) per crop
        # Scores, codes and loss in float32, like the queue's scores (see fp32_loss).
        with fp32_loss(projections[0]):
            embeddings = [F.normalize(z.to(self.prototypes.weight.dtype), dim=1) for z in projections]
            # Every crop's scores in one product, as one (crops, B, swav_prototypes) tensor.
            scores = self.prototypes(torch.cat(embeddings)).unflatten(0, (len(views), -1))
            queue_scores = None
            if self.queue_full:
                # The queue's embeddings against the current prototypes join the codes' batch.
                with torch.no_grad():
                    queue_scores = [self.queue[i] @ self.prototypes.weight.t() for i in range(N_GLOBAL)]
            loss = swav_multicrop(
                scores,
                temperature=config.temperature,
                epsilon=config.swav_epsilon,
                sinkhorn_iterations=config.swav_iterations,
                n_global=N_GLOBAL,
                queue_scores=queue_scores,
                impl=config.loss_impl,
            )
            if config.queue_size > 0:
                self._enqueue(embeddings[:N_GLOBAL])
            return loss

    @torch.no_grad()
    def _enqueue(self, embeddings: list[Tensor]) -> None:
        """Write the global crops' embeddings ``(B, D)`` into their queues, a ring buffer each
        (the oldest rows are overwritten). The queue never enters the autograd graph."""
        size = self.config.queue_size
        new = torch.stack([z.detach()[-size:] for z in embeddings]).to(self.queue.dtype)  # (2, B, D)
        rows = (self.queue_count + torch.arange(new.shape[1], device=new.device)) % size
        self.queue.index_copy_(1, rows, new)
        self.queue_count += new.shape[1]

    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Project the prototypes back onto the unit sphere (Caron et al. 2020, sec. 4 "prototypes")."""
        weight = self.prototypes.weight
        weight.copy_(F.normalize(weight, dim=1))

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "queue_count": self.queue_count}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.queue_count = int(state["queue_count"])
