"""VICReg (Bardes et al. 2022, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning")."""

from __future__ import annotations

from torch import Tensor

from harness.distributed import gather
from harness.losses import vicreg
from harness.methods.base import Method, encode_views, fp32_loss, mlp
from harness.spec import MethodSpec, TrialConfig

SPEC = MethodSpec(
    name="vicreg",
    paper="Bardes et al. 2022, VICReg: Variance-Invariance-Covariance Regularization",
    knobs={
        "vicreg_sim_coeff": 25.0,
        "vicreg_std_coeff": 25.0,
        "vicreg_cov_coeff": 1.0,
        "proj_hidden_dim": 2048,
        "proj_dim": 2048,
    },
    cite="lambda = mu = 25, nu = 1; projector 2048 on CIFAR (solo-learn)",
    colour="#8c564b",
)


class VICReg(Method):
    """Invariance (MSE between the two views' embeddings), variance (a hinge keeping each
    dimension's standard deviation above 1) and covariance (decorrelating the dimensions) terms,
    weighted by ``vicreg_sim_coeff``, ``vicreg_std_coeff`` and ``vicreg_cov_coeff`` (Bardes et al.
    2022, eq. 6).

    The expander is the paper's 3-layer MLP (Linear-BN-ReLU twice, then Linear); the views are
    BYOL's augmentations, as in the paper. State: none beyond the expander.
    Knobs: ``vicreg_sim_coeff``, ``vicreg_std_coeff``, ``vicreg_cov_coeff``, ``proj_hidden_dim``, ``proj_dim``.
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
        # Variance and covariance of the global batch on several processes.
        z1, z2 = gather(*encode_views(self.embed, views[:2]))  # (N, proj_dim) each
        config = self.config
        with fp32_loss(z1):
            return vicreg(
                z1,
                z2,
                sim_coeff=config.vicreg_sim_coeff,
                std_coeff=config.vicreg_std_coeff,
                cov_coeff=config.vicreg_cov_coeff,
                impl=config.loss_impl,
            )
