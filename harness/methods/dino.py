"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.distributed import gather
from harness.losses import dino_multicrop
from harness.methods.base import Method, encode_views, fp32_loss, frozen_copy, mlp
from harness.spec import MethodSpec, TrialConfig

N_GLOBAL = 2

SPEC = MethodSpec(
    name="dino",
    paper="Caron et al. 2021, Emerging Properties in Self-Supervised Vision Transformers",
    knobs={
        "momentum": 0.996,
        "proj_hidden_dim": 512,
        "proj_dim": 256,
        "local_crops": 2,
        "dino_out_dim": 1024,
        "dino_student_temp": 0.1,
        "dino_teacher_temp": 0.07,
        "dino_warmup_teacher_temp": 0.04,
        "dino_warmup_teacher_temp_epochs": ...,
        "dino_center_momentum": 0.9,
        "dino_head_bn": True,
    },
    cite="student temperature 0.1, teacher 0.04 -> 0.07 warm-up, center momentum 0.9, teacher "
    "momentum 0.996; bottleneck 256, output dimension scaled down to 1024; batch norm in the head "
    "(the official use_bn_in_head, solo-learn's default for CNNs; without it the small CNN's DINO "
    "stays at the uniform teacher, docs/FINDINGS.md)",
    colour="#bcbd22",
)


class DINO(Method):
    """Self-distillation without labels: the student (all crops) matches the output distribution
    of a momentum teacher (global crops only), centered and sharpened, for every pair of distinct
    crops (Caron et al. 2021, Algorithm 1 and sec. 3.1 multi-crop).

    Head: a 3-layer MLP with GELU (``proj_hidden_dim`` wide, ``proj_dim`` bottleneck; batch norm
    after its hidden layers when ``dino_head_bn``, the official ``use_bn_in_head`` and solo-learn's
    setting for convolutional backbones: without it the small CNN's features, all alike at
    initialization, give a nearly constant teacher output that centering turns into a uniform
    teacher, and the loss stays at ``ln(dino_out_dim)``; docs/FINDINGS.md),
    L2 normalization, then a bias-free weight-normalized layer to ``dino_out_dim`` whose norm is
    fixed to 1 (the paper's ``norm_last_layer``), computed here by normalizing the weight rows in
    the forward pass.

    Schedules: the teacher momentum follows the cosine schedule from ``momentum`` to 1; the teacher
    temperature rises linearly from ``dino_warmup_teacher_temp`` to ``dino_teacher_temp`` over
    ``dino_warmup_teacher_temp_epochs`` epochs (fractional epochs, so the final value is reached at
    that epoch; the paper steps it once per epoch), then stays.

    State: ``teacher_backbone``/``teacher_projector``/``teacher_last_layer`` (EMA of the student,
    updated after each optimizer step); ``center`` ``(dino_out_dim,)``, an EMA with
    ``dino_center_momentum`` of the teacher's mean output, updated in each training step.
    Not implemented: freezing the last layer in the first epoch, gradient clipping.
    Knobs: ``momentum``, ``local_crops``, ``dino_out_dim``, ``dino_student_temp``,
    ``dino_teacher_temp``, ``dino_warmup_teacher_temp``, ``dino_warmup_teacher_temp_epochs``,
    ``dino_center_momentum``, ``dino_head_bn``, ``proj_hidden_dim``, ``proj_dim``.
    """

    spec = SPEC
    recipe = "multicrop"

    center: Tensor

    def __init__(self, config: TrialConfig, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__(config, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        hidden = config.proj_hidden_dim
        self.projector = mlp(
            [self.feature_dim, hidden, hidden, config.proj_dim], batch_norm=config.dino_head_bn, activation=nn.GELU
        )
        self.last_layer = nn.Linear(config.proj_dim, config.dino_out_dim, bias=False)
        self.teacher_backbone = frozen_copy(self.backbone)
        self.teacher_projector = frozen_copy(self.projector)
        self.teacher_last_layer = frozen_copy(self.last_layer)
        self.register_buffer("center", torch.zeros(config.dino_out_dim))

    @property
    def n_local_crops(self) -> int:
        return self.config.local_crops

    def embed(self, x: Tensor) -> Tensor:
        """The bottleneck embedding ``(B, proj_dim)``, before the L2 normalization."""
        return self.projector(self.backbone(x))

    def _student(self, x: Tensor) -> Tensor:
        return _prototype_logits(self.embed(x), self.last_layer)

    def _teacher(self, x: Tensor) -> Tensor:
        return _prototype_logits(self.teacher_projector(self.teacher_backbone(x)), self.teacher_last_layer)

    def teacher_temperature(self) -> float:
        """Linear warm-up in epochs (Caron et al. 2021, sec. 3.1 and appendix)."""
        config = self.config
        warmup = config.dino_warmup_teacher_temp_epochs
        progress = 1.0 if warmup <= 0 else min(self.epoch_progress / warmup, 1.0)
        start = config.dino_warmup_teacher_temp
        return start + (config.dino_teacher_temp - start) * progress

    def training_loss(self, views: list[Tensor], labels: Tensor) -> Tensor:
        config = self.config
        student = encode_views(self._student, views)  # (B, dino_out_dim) per crop
        with torch.no_grad():
            teacher = encode_views(self._teacher, views[:N_GLOBAL])
        # The center follows the global batch on several processes.
        student, teacher = list(gather(*student)), list(gather(*teacher))
        # Every (teacher crop, student crop) pair except a crop with itself (Algorithm 1).
        with fp32_loss(self.center):
            loss = dino_multicrop(
                student,
                teacher,
                self.center,
                student_temp=config.dino_student_temp,
                teacher_temp=self.teacher_temperature(),
                impl=config.loss_impl,
            )
        self._update_center(teacher)
        return loss

    @torch.no_grad()
    def _update_center(self, teacher: list[Tensor]) -> None:
        """``c <- m c + (1 - m) mean(teacher outputs)`` (Caron et al. 2021, eq. 4); out of place."""
        batch_center = torch.cat(teacher).to(self.center.dtype).mean(dim=0)
        momentum = self.config.dino_center_momentum
        self.center = self.center * momentum + batch_center * (1.0 - momentum)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.teacher_backbone, self.backbone),
            (self.teacher_projector, self.projector),
            (self.teacher_last_layer, self.last_layer),
        ]

    def target_momentum(self, step: int) -> float:
        return self.cosine_momentum(self.config.momentum, step)


def _prototype_logits(z: Tensor, last_layer: nn.Linear) -> Tensor:
    """L2-normalize the bottleneck ``(B, D)`` and apply the weight-normalized layer (unit rows)."""
    return F.linear(F.normalize(z, dim=1), F.normalize(last_layer.weight, dim=1))
