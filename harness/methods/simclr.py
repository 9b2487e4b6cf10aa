"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations")."""

from __future__ import annotations

from torch import Tensor

from harness.distributed import gather
from harness.losses import nt_xent
from harness.methods.base import Method, encode_views, fp32_loss, mlp
from harness.spec import MethodSpec, TrialConfig

SPEC = MethodSpec(
    name="simclr",
    paper="Chen et al. 2020, A Simple Framework for Contrastive Learning of Visual Representations",
    knobs={"temperature": 0.5, "proj_hidden_dim": 512, "proj_dim": 128},
    cite="CIFAR-10 appendix B.9: temperature 0.5; projector a 2-layer MLP with a 128-d output",
    colour="#1f77b4",
)


class SimCLR(Method):
    """Two views through one encoder and a 2-layer MLP projector; NT-Xent over the 2N projections,
    each view's positive being the other view of its image (Chen et al. 2020, sec. 2.1).

    Knobs: ``temperature``, ``proj_hidden_dim``, ``proj_dim``.
    """

    spec = SPEC

    def __init__(self, config: TrialConfig, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__(config, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        self.projector = mlp([self.feature_dim, config.proj_hidden_dim, config.proj_dim])

    def training_loss(self, views: list[Tensor], labels: Tensor) -> Tensor:
        # The negatives of the global batch when the trial runs on several processes.
        z1, z2 = gather(*encode_views(self.embed, views[:2]))  # (N, proj_dim) each
        with fp32_loss(z1):
            return nt_xent(z1, z2, temperature=self.config.temperature, impl=self.config.loss_impl)

    def embed(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))
