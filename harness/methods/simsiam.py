"""SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning")."""

from __future__ import annotations

from torch import Tensor, nn

from harness.distributed import gather
from harness.losses import byol
from harness.methods.base import Method, encode_views, fp32_loss, mlp
from harness.spec import MethodSpec, TrialConfig

SPEC = MethodSpec(
    name="simsiam",
    paper="Chen and He 2021, Exploring Simple Siamese Representation Learning",
    knobs={
        "proj_hidden_dim": 2048,
        "proj_dim": 2048,
        "pred_hidden_dim": 512,
        "simsiam_stop_gradient": ...,
        "simsiam_predictor": ...,
    },
    cite="CIFAR setting: 2048-d projector, predictor bottleneck 512",
    colour="#d62728",
)


class SimSiam(Method):
    """BYOL without the momentum encoder: the predictor's output of one view regresses the
    stop-gradient projection of the other, ``L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2`` with
    ``D = -cos`` (Chen & He 2021, eq. 3-4; minimum -1).

    The projector is the CIFAR one of the paper (2 layers, BN after each, the output BN without
    affine parameters); the predictor a Linear-BN-ReLU-Linear bottleneck of ``pred_hidden_dim``.
    State: none beyond the heads. Knobs: ``proj_hidden_dim``, ``proj_dim``, ``pred_hidden_dim``,
    and two ablations of the paper's sec. 4.1-4.2: ``simsiam_stop_gradient`` (false: the gradient
    also flows through the target branch, which the paper shows collapses to a constant) and
    ``simsiam_predictor`` (false: the projection regresses the other projection directly, ``p = z``).
    """

    spec = SPEC

    def __init__(self, config: TrialConfig, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__(config, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        self.projector = mlp(
            [self.feature_dim, config.proj_hidden_dim, config.proj_dim], last_batch_norm=True
        )
        self.predictor = (
            mlp([config.proj_dim, config.pred_hidden_dim, config.proj_dim]) if config.simsiam_predictor else nn.Identity()
        )

    def embed(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))

    def training_loss(self, views: list[Tensor], labels: Tensor) -> Tensor:
        z1, z2 = encode_views(self.embed, views[:2])  # (N, proj_dim) each
        p1, p2 = self.predictor(z1), self.predictor(z2)
        z1, z2, p1, p2 = gather(z1, z2, p1, p2)
        impl = self.config.loss_impl
        # byol(p, z) is the mean of 2 - 2 cos(p, z), so -cos = byol / 2 - 1.
        if self.config.simsiam_stop_gradient:
            z1, z2 = z1.detach(), z2.detach()
        with fp32_loss(p1):
            distance = byol(p1, z2, impl=impl) + byol(p2, z1, impl=impl)
        return distance / 4 - 1
