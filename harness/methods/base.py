"""The interface every method implements, and the pieces the methods share.

A method owns everything it trains (backbone, projector, predictor, prototypes, classifier) and
everything it carries between steps (EMA targets, queues, centers) as submodules and buffers, so
``state_dict`` saves and restores a run completely. Schedules read two counters (the optimizer steps
taken, the steps of the run), kept as plain Python numbers in the module's extra state: no device
synchronisation per step, and still part of ``state_dict``.

The training loop (``harness.train``) drives a method like this::

    method = METHODS[name](config, in_channels=C, image_size=H, num_classes=K)  # after torch.manual_seed
    method.on_train_start(total_steps, steps_per_epoch)
    for step in range(total_steps):
        views = make_views(images, method.view_recipe, strength, n_local=method.n_local_crops, ...)
        loss = method.training_loss(views, labels)
        loss.backward(); optimizer.step()        # optimizer over method.optimizer_parameters()
        method.after_optimizer_step(step)        # step: 0-based index of the step just taken
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from harness.backbones import build_backbone
from harness.spec import MethodSpec, TrialConfig


class Method(nn.Module):
    """Base class: builds the backbone, keeps the schedule counters, defines the defaults.

    Subclasses set ``name`` (the key in ``METHODS``), build their heads in ``__init__`` from the
    configuration (every default lives in ``harness.spec``), and implement ``training_loss``.
    """

    # The method's declaration (the top of its file); name, trainable and uses_labels follow it.
    spec: ClassVar[MethodSpec]
    name: ClassVar[str]
    uses_labels: ClassVar[bool]
    trainable: ClassVar[bool]
    # The augmentation recipe of harness.data.make_views that the method's paper trains with.
    recipe: ClassVar[str] = "simclr"

    backbone: nn.Module
    feature_dim: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "spec" in cls.__dict__:
            cls.name = cls.spec.name
            cls.trainable = cls.spec.trains
            cls.uses_labels = cls.spec.uses_labels

    def __init__(self, config: TrialConfig, *, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        if config.method != self.name:
            raise ValueError(f"configuration for method {config.method!r} given to {type(self).__name__}")
        self.config = config
        self.num_classes = num_classes
        self.backbone, self.feature_dim = build_backbone(config.backbone, in_channels, image_size)
        # Schedule counters (see the module docstring): steps taken, steps of the whole run.
        self.steps_done = 0
        self.total_steps: int | None = None
        self.steps_per_epoch: int | None = None

    # -- what the training loop reads ----------------------------------------------------------

    @property
    def view_recipe(self) -> str:
        return self.recipe

    @property
    def n_local_crops(self) -> int:
        return 0

    @property
    def n_views(self) -> int:
        """Views of a two-view recipe that ``training_loss`` reads (1: only the first is made)."""
        return 2

    def training_loss(self, views: list[Tensor], labels: Tensor) -> Tensor:
        """Scalar loss of one batch. ``views``: normalized float ``(B, C, H, W)`` each, the global
        views first, then the local crops (possibly smaller H, W); ``labels``: int64 ``(B,)``."""
        raise NotImplementedError

    def on_train_start(self, total_steps: int, steps_per_epoch: int) -> None:
        """Fix the length of the run, which the momentum and temperature schedules follow."""
        self.total_steps = int(total_steps)
        self.steps_per_epoch = int(steps_per_epoch)
        self.steps_done = 0

    def after_optimizer_step(self, step: int) -> None:
        """Called after each optimizer step, ``step`` being its 0-based index in the run: counts
        the step and moves the EMA targets of ``momentum_pairs`` toward their online networks."""
        self.steps_done = step + 1
        pairs = self.momentum_pairs()
        if pairs:
            momentum = self.target_momentum(step)
            for target, online in pairs:
                ema_update(target, online, momentum)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(EMA target, online network) pairs; none for methods without a momentum encoder."""
        return []

    def target_momentum(self, step: int) -> float:
        """The EMA momentum applied after optimizer step ``step``: ``config.momentum``, constant."""
        return self.config.momentum

    def embed(self, x: Tensor) -> Tensor:
        """The projection used for alignment/uniformity, unnormalized: ``(B, C, H, W) -> (B, D)``."""
        return self.backbone(x)

    def optimizer_parameters(self) -> list[nn.Parameter]:
        """The online parameters: target networks are frozen (``requires_grad=False``)."""
        return [p for p in self.parameters() if p.requires_grad]

    # -- state that is not a tensor --------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "steps_done": self.steps_done,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])
        self.total_steps = state["total_steps"]
        self.steps_per_epoch = state["steps_per_epoch"]

    # -- helpers ----------------------------------------------------------------------------------

    @property
    def epoch_progress(self) -> float:
        """Epochs completed so far, fractional (0 before ``on_train_start``)."""
        if not self.steps_per_epoch:
            return 0.0
        return self.steps_done / self.steps_per_epoch

    def cosine_momentum(self, base: float, step: int) -> float:
        """Grill et al. 2020 (BYOL), eq. after (2): ``1 - (1 - base) (cos(pi k / K) + 1) / 2`` for
        step ``k`` of ``K``; ``base`` when the run length is unknown."""
        if not self.total_steps:
            return base
        progress = min(step / self.total_steps, 1.0)
        return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def mlp(
    dims: Sequence[int],
    *,
    batch_norm: bool = True,
    last_batch_norm: bool = False,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Linear layers ``dims[0] -> ... -> dims[-1]``; each hidden layer is Linear-BN-activation
    (BN optional), the output layer a plain Linear, optionally followed by an affine-free BN
    (SimSiam's projector). Linear layers followed by BN have no bias (BN's shift replaces it)."""
    if len(dims) < 2:
        raise ValueError(f"an MLP needs at least input and output sizes, got {list(dims)}")
    layers: list[nn.Module] = []
    for i in range(len(dims) - 2):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(dims[i + 1]))
        layers.append(activation())
    layers.append(nn.Linear(dims[-2], dims[-1], bias=not last_batch_norm))
    if last_batch_norm:
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy with the same weights that no optimizer updates (EMA targets, key encoders)."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * online``, parameter by parameter
    (He et al. 2020, eq. 2; Grill et al. 2020, eq. 1). Buffers are not averaged: the target's BN
    runs in training mode on batch statistics, like the papers' implementations."""
    targets = list(target.parameters())
    onlines = list(online.parameters())
    if len(targets) != len(onlines):
        raise ValueError("EMA target and online network differ in structure")
    if targets:
        torch._foreach_lerp_(targets, onlines, 1.0 - momentum)


@torch.no_grad()
def ring_write(buffer: Tensor, pointer: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """``rows`` ``(M, D)`` written into the ring buffer ``buffer`` ``(K, D)`` at ``pointer``, wrapping
    around (the oldest rows are overwritten; of more than K rows the last K are kept): the new buffer
    and pointer. Out of place, since the loss of the step that enqueues still refers to the old
    buffer (MoCo's queue, NNCLR's support set)."""
    size = buffer.shape[0]
    rows = rows[-size:].to(buffer.dtype)
    index = (pointer + torch.arange(rows.shape[0], device=rows.device)) % size
    return buffer.index_copy(0, index, rows), (pointer + rows.shape[0]) % size


def encode_views(encoder: Callable[[Tensor], Tensor], views: Iterable[Tensor]) -> list[Tensor]:
    """``encoder`` applied to each view, with consecutive views of the same resolution batched
    into one forward pass (the multi-crop forward of Caron et al. 2020/2021): one pass for the
    global views, one for the local crops. Returns one ``(B, ...)`` output per view."""
    views = list(views)
    outputs: list[Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[1:] == views[start].shape[1:]:
            end += 1
        group = views[start:end]
        batch = group[0] if len(group) == 1 else torch.cat(group)
        outputs.extend(encoder(batch).split([v.shape[0] for v in group]))
        start = end
    return outputs


def fp32_loss(reference: Tensor) -> contextlib.AbstractContextManager[None]:
    """Autocast off around a loss on ``reference``'s device. The heads run in bf16 under the
    training loop's autocast, but ``harness.losses`` compute in float32 (they upcast 16-bit inputs):
    with autocast on, their matrix products would drop back to bf16 (logits ``/ 0.1`` keep about
    two significant digits) and their custom backward passes would meet mixed dtypes. The loss
    matrices are small next to the backbone, so this costs nothing measurable."""
    return torch.autocast(reference.device.type, enabled=False)
