from __future__ import annotations

import itertools
import math

import pytest
import torch

from harness.optim import LARS, build_optimizer, lr_at, scaled_lr


def test_scaled_lr__is_linear_in_batch_size() -> None:
    assert scaled_lr(0.3, 256) == pytest.approx(0.3)
    assert scaled_lr(0.3, 512) == pytest.approx(0.6)
    assert scaled_lr(0.3, 64) == pytest.approx(0.075)


def test_lr_at__warms_up_linearly_then_decays_by_cosine_to_zero() -> None:
    base, total, warmup = 1.0, 100, 10
    assert lr_at(0, total, warmup, base) == pytest.approx(0.1)
    assert lr_at(9, total, warmup, base) == pytest.approx(1.0)
    assert lr_at(10, total, warmup, base) == pytest.approx(1.0)
    middle = 10 + 45
    assert lr_at(middle, total, warmup, base) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, total, warmup, base) == pytest.approx(0.0, abs=1e-12)
    values = [lr_at(s, total, warmup, base) for s in range(warmup, total)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_lars__scales_the_step_by_the_trust_ratio_and_skips_biases() -> None:
    weight = torch.nn.Parameter(torch.full((2, 2), 2.0))
    bias = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.full((2, 2), 0.5)
    bias.grad = torch.full((2,), 0.5)
    optimizer = LARS([weight, bias], lr=0.1, momentum=0.0, weight_decay=0.0, eta=0.02)
    optimizer.step()
    trust = 0.02 * 4.0 / 1.0  # eta * ||w|| / ||g||
    assert torch.allclose(weight, torch.full((2, 2), 2.0 - 0.1 * 0.5 * trust))
    assert torch.allclose(bias, torch.full((2,), 1.0 - 0.1 * 0.5))


@pytest.mark.parametrize("name", ["sgd", "adam", "lars"])
def test_build_optimizer__reduces_a_quadratic(name: str) -> None:
    param = torch.nn.Parameter(torch.tensor([[3.0, -2.0]]))
    optimizer = build_optimizer(name, [param], lr=0.05, weight_decay=0.0)
    for _ in range(50):
        optimizer.zero_grad()
        (param**2).sum().backward()
        optimizer.step()
    assert float((param**2).sum()) < 13.0 * 0.5


def test_build_optimizer__unknown_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="optimizer: found 'rmsprop'"):
        build_optimizer("rmsprop", [torch.nn.Parameter(torch.zeros(1))], lr=0.1, weight_decay=0.0)
