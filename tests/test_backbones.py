"""Backbone factories: output shapes, gradients, errors."""

from __future__ import annotations

import pytest
import torch

from harness.backbones import BACKBONES, build_backbone

CONTRACT = [
    pytest.param(name, channels, size, id=f"{name}-{channels}ch-{size}px")
    for name in BACKBONES
    for channels in (1, 3)
    for size in (28, 32, 96)
]


@pytest.mark.parametrize(("name", "channels", "size"), CONTRACT)
def test_backbones__output_shape(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    module, dim = BACKBONES[name](in_channels=channels, image_size=size)
    out = module(torch.randn(2, channels, size, size))
    assert isinstance(dim, int) and out.shape == (2, dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in BACKBONES])
def test_backbones__gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    module, _ = build_backbone(name, 1, 28)
    module(torch.randn(4, 1, 28, 28)).square().mean().backward()
    for pname, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
    first = next(module.parameters())
    assert first.grad.abs().sum() > 0


def test_backbones__feature_dims() -> None:
    assert build_backbone("small_cnn")[1] == 256
    assert build_backbone("resnet18", 3, 32)[1] == 512


def test_backbones__resnet18_has_cifar_stem() -> None:
    module, _ = build_backbone("resnet18", 1, 28)
    assert module.conv1.kernel_size == (3, 3) and module.conv1.stride == (1, 1)
    assert isinstance(module.maxpool, torch.nn.Identity) and isinstance(module.fc, torch.nn.Identity)


def test_build_backbone__unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vit'") as info:
        build_backbone("vit")
    assert all(name in str(info.value) for name in BACKBONES)


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in BACKBONES])
def test_backbones__bad_arguments(name: str) -> None:
    with pytest.raises(ValueError, match="in_channels"):
        BACKBONES[name](in_channels=0)
    with pytest.raises(ValueError, match="image_size"):
        BACKBONES[name](in_channels=1, image_size=2)
