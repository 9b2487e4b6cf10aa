"""Optimizers (SGD, Adam, LARS) and the learning-rate schedule of a trial.

The learning rate of a configuration is given per 256 images and scaled linearly with the batch
size (Goyal et al. 2017, "Accurate, Large Minibatch SGD"); it warms up linearly for
``warmup_epochs`` and then follows a half-cosine to zero (Loshchilov & Hutter 2017).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

SGD_MOMENTUM = 0.9
LARS_ETA = 0.02  # trust coefficient of solo-learn's CIFAR LARS settings
ADAM_BETAS = (0.9, 0.999)


def scaled_lr(lr_per_256: float, batch_size: int) -> float:
    return lr_per_256 * batch_size / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to zero at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) over SGD with momentum.

    Biases and normalization parameters (1-d tensors) are excluded from both weight decay and the
    trust-ratio adaptation, as in SimCLR and BYOL.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        momentum: float = SGD_MOMENTUM,
        weight_decay: float = 0.0,
        eta: float = LARS_ETA,
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta})

    @torch.no_grad()
    def step(self, closure: object = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if param.ndim > 1:
                    grad = grad.add(param, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(param)
                    grad_norm = torch.linalg.vector_norm(grad)
                    trust = torch.where(
                        (param_norm > 0) & (grad_norm > 0),
                        group["eta"] * param_norm / grad_norm,
                        torch.ones_like(param_norm),
                    )
                    grad = grad.mul(trust)
                state = self.state[param]
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = state["momentum_buffer"] = grad.clone()
                else:
                    buffer.mul_(group["momentum"]).add_(grad)
                param.add_(buffer, alpha=-group["lr"])


def build_optimizer(
    name: str, parameters: Iterable[nn.Parameter], *, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """One of ``sgd``, ``adam``, ``lars`` at learning rate ``lr`` (already batch-scaled)."""
    params = [p for p in parameters if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.AdamW(params, lr=lr, betas=ADAM_BETAS, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer: found {name!r}, expected one of sgd, adam, lars")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
