"""Encoder factories: ``BACKBONES[name](in_channels, image_size) -> (module, feature_dim)``.

Each module maps float ``(B, C, H, W)`` to features ``(B, feature_dim)``. Adding a backbone is one
factory plus one line in :data:`BACKBONES`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["BACKBONES", "BackboneFactory", "build_backbone", "resnet18", "small_cnn"]

BackboneFactory = Callable[..., tuple[nn.Module, int]]


def _check(name: str, in_channels: int, image_size: int, min_size: int) -> None:
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"{name}: in_channels must be a positive int, got {in_channels!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < min_size:
        raise ValueError(f"{name}: image_size must be an int >= {min_size}, got {image_size!r}")


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(in_channels: int = 1, image_size: int = 28) -> tuple[nn.Module, int]:
    """The seed notebook's encoder: 3 conv blocks (32, 64, 128 channels, two 2x2 max-pools), global
    average pool, Linear(128, 256) + ReLU. Features ``(B, 256)``; any input size >= 4 px."""
    _check("small_cnn", in_channels, image_size, 4)
    module = nn.Sequential(
        *_conv_bn_relu(in_channels, 32),
        nn.MaxPool2d(2),
        *_conv_bn_relu(32, 64),
        nn.MaxPool2d(2),
        *_conv_bn_relu(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 256),
        nn.ReLU(inplace=True),
    )
    return module, 256


def resnet18(in_channels: int = 1, image_size: int = 28) -> tuple[nn.Module, int]:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool) and no
    classifier. Features ``(B, 512)``; 1 or 3 channels, any input size >= 8 px (28, 32, 96 ...)."""
    _check("resnet18", in_channels, image_size, 8)
    from torchvision.models import resnet18 as tv_resnet18  # a torch extension; imported on use

    module = tv_resnet18(weights=None)
    module.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(module.conv1.weight, mode="fan_out", nonlinearity="relu")
    module.maxpool = nn.Identity()
    module.fc = nn.Identity()
    return module, 512


BACKBONES: dict[str, BackboneFactory] = {
    "small_cnn": small_cnn,
    "resnet18": resnet18,
}


def build_backbone(name: str, in_channels: int = 1, image_size: int = 28) -> tuple[nn.Module, int]:
    """``BACKBONES[name](in_channels, image_size)``, with a clear error for an unknown name."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](in_channels=in_channels, image_size=image_size)

