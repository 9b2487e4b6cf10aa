"""Encoder factories: ``BACKBONES[name](in_channels, image_size) -> (module, feature_dim)``.

Each module maps float ``(B, C, H, W)`` to features ``(B, feature_dim)``. Adding a backbone is one
factory plus one line in :data:`BACKBONES`. Besides these, ``timm:NAME`` builds timm's architecture
``NAME`` (:func:`timm_backbone`, the optional ``timm`` extra).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.spec import TIMM_PREFIX, timm_model_name

__all__ = [
    "BACKBONES",
    "BackboneFactory",
    "ConvBatchNorm2d",
    "VisionTransformerEncoder",
    "build_backbone",
    "plain_copy",
    "resnet18",
    "resnet50",
    "small_cnn",
    "timm_backbone",
    "vit_patch_size",
    "vit_small",
]

BackboneFactory = Callable[..., tuple[nn.Module, int]]


def _check(name: str, in_channels: int, image_size: int, min_size: int) -> None:
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"{name}: in_channels must be a positive int, got {in_channels!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < min_size:
        raise ValueError(f"{name}: image_size must be an int >= {min_size}, got {image_size!r}")


class ConvBatchNorm2d(nn.Module):
    """``bn(conv(x))`` for a bias-free ``conv`` (stride, padding; one group) and a ``BatchNorm2d``,
    exactly, with the training-mode batch statistics taken from the input's patches when that is
    cheaper than reading the output.

    A convolution is linear in each patch ``p`` (``C_in * k * k`` values), so output channel ``c``
    has batch mean ``w_c . m`` and biased variance ``w_c^T S w_c``, where ``m`` and ``S`` are the
    mean and covariance of the patches. When a patch is smaller than the number of output channels
    (a stem on grayscale or RGB images: 9 or 27 values against 32 or 64 channels) these statistics
    cost a fraction of batch norm's passes over the full-resolution output. The normalization then
    folds into the convolution's weight and bias, so the output is written once, already normalized.
    Autograd differentiates through these statistics exactly as through batch norm's own,
    and the running statistics are updated as ``nn.BatchNorm2d`` updates them (unbiased variance).
    When the batch norm is not in training mode (its own flag: freezing it works as usual), when the
    patch is not smaller, or when the layers were swapped or hooked, it runs the two layers as they are.

    Shapes: ``(N, C_in, H, W) -> (N, C_out, H', W')``. The parameters and buffers are those of the
    two layers, named ``conv.*`` and ``bn.*``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1, padding: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)

    @property
    def folds_statistics(self) -> bool:
        """Whether training-mode statistics come from the patches: a patch smaller than the output
        channels, and two layers still as built (a plain convolution, an affine ``BatchNorm2d`` in
        training mode, no hooks). Anything else (a frozen batch norm, ``SyncBatchNorm``, a hook that
        must see the layers run) takes the plain path."""
        conv, bn = self.conv, self.bn
        as_built = (
            type(conv) is nn.Conv2d
            and type(bn) is nn.BatchNorm2d
            and conv.bias is None
            and conv.groups == 1
            and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros"
            and bn.affine
        )
        hooked = any((conv._forward_hooks, conv._forward_pre_hooks, bn._forward_hooks, bn._forward_pre_hooks))
        return as_built and not hooked and bn.training and conv.weight[0].numel() < conv.out_channels

    def forward(self, x: Tensor) -> Tensor:
        if not self.folds_statistics:
            return self.bn(self.conv(x))
        mean, variance, count = self._batch_statistics(x)
        self._update_running_statistics(mean, variance, count)
        scale = torch.rsqrt(variance + self.bn.eps) * self.bn.weight
        shift = self.bn.bias - mean * scale
        weight = self.conv.weight * scale.to(self.conv.weight.dtype)[:, None, None, None]
        return F.conv2d(x, weight, shift.to(weight.dtype), stride=self.conv.stride, padding=self.conv.padding)

    def _batch_statistics(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        """Per-channel batch mean and biased variance of ``conv(x)`` from the patches, in float32
        (float64 for a float64 ``x``)."""
        conv = self.conv
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        # Statistics stay in float32 under bf16 autocast, as batch norm keeps them.
        with torch.autocast(x.device.type, enabled=False):
            patches = F.unfold(x.to(dtype), conv.kernel_size, padding=conv.padding, stride=conv.stride)
            size = patches.shape[1]
            patches = patches.transpose(0, 1).reshape(size, -1)  # (C_in*k*k, N*H'*W')
            count = patches.shape[1]
            if count < 2:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
                )
            patch_mean = patches.mean(dim=1)
            centered = patches - patch_mean[:, None]
            patch_covariance = centered @ centered.T / count
            weight = conv.weight.to(dtype).reshape(conv.out_channels, size)
            mean = weight @ patch_mean
            variance = ((weight @ patch_covariance) * weight).sum(dim=1).clamp_min(0)
        return mean, variance, count

    @torch.no_grad()
    def _update_running_statistics(self, mean: Tensor, variance: Tensor, count: int) -> None:
        bn = self.bn
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            return
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), factor)
        unbiased = variance.detach() * (count / (count - 1))
        bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(
    in_channels: int = 1, image_size: int = 28, *, fused_stem: bool = True
) -> tuple[nn.Module, int]:
    """The seed notebook's encoder: 3 conv blocks (32, 64, 128 channels, two 2x2 max-pools), global
    average pool, Linear(128, 256) + ReLU. Features ``(B, 256)``; any input size >= 4 px.

    ``fused_stem`` computes the first block's convolution and batch norm as one
    :class:`ConvBatchNorm2d` (the same function, faster); ``False`` gives the seed's plain layers."""
    _check("small_cnn", in_channels, image_size, 4)
    stem = (
        [ConvBatchNorm2d(in_channels, 32), nn.ReLU(inplace=True)]
        if fused_stem
        else _conv_bn_relu(in_channels, 32)
    )
    module = nn.Sequential(
        *stem,
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


# At and above this input side, ResNets take torchvision's ImageNet stem (7x7 stride 2 + max-pool);
# below, the CIFAR stem (3x3 stride 1, no max-pool), as SimCLR/solo-learn do for 32 and 96 px.
IMAGENET_STEM_MIN_SIZE = 128


def _resnet(
    name: str, builder: Callable[..., nn.Module], in_channels: int, image_size: int, fused_stem: bool
) -> nn.Module:
    _check(name, in_channels, image_size, 8)
    module = builder(weights=None)
    kernel, stride, padding = (7, 2, 3) if image_size >= IMAGENET_STEM_MIN_SIZE else (3, 1, 1)
    stem_conv = nn.Conv2d(in_channels, 64, kernel_size=kernel, stride=stride, padding=padding, bias=False)
    nn.init.kaiming_normal_(stem_conv.weight, mode="fan_out", nonlinearity="relu")
    if fused_stem:
        # Exact at every size; it only saves work where a patch (C_in*k*k) is smaller than the 64
        # output channels (the 3x3 stems, and the 7x7 stem on grayscale): elsewhere it runs the layers.
        fused = ConvBatchNorm2d(in_channels, 64, kernel, stride=stride, padding=padding)
        fused.conv = stem_conv
        module.conv1, module.bn1 = fused, nn.Identity()
    else:
        module.conv1 = stem_conv
    if image_size < IMAGENET_STEM_MIN_SIZE:
        module.maxpool = nn.Identity()
    module.fc = nn.Identity()
    module.image_size = image_size
    return module


def resnet18(in_channels: int = 1, image_size: int = 28, *, fused_stem: bool = True) -> tuple[nn.Module, int]:
    """torchvision's ResNet-18 without classifier. Features ``(B, 512)``; 1 or 3 channels, any
    input size >= 8 px. Below 128 px the CIFAR stem (3x3 conv, stride 1, no max-pool), from 128 px
    torchvision's own (7x7 stride 2, max-pool).

    ``fused_stem`` computes the stem's convolution and batch norm as one :class:`ConvBatchNorm2d`
    in ``conv1`` (``bn1`` becomes the identity); ``False`` keeps torchvision's two layers."""
    from torchvision.models import resnet18 as tv_resnet18  # a torch extension; imported on use

    return _resnet("resnet18", tv_resnet18, in_channels, image_size, fused_stem), 512


def resnet50(in_channels: int = 1, image_size: int = 28, *, fused_stem: bool = True) -> tuple[nn.Module, int]:
    """torchvision's ResNet-50 (bottleneck blocks) without classifier. Features ``(B, 2048)``; the
    stems and ``fused_stem`` as :func:`resnet18`."""
    from torchvision.models import resnet50 as tv_resnet50

    return _resnet("resnet50", tv_resnet50, in_channels, image_size, fused_stem), 2048


def vit_patch_size(image_size: int) -> int:
    """ViT-S's patch side for an input side: 16 from 160 px (ViT-S/16 at 224: 14x14 patches), 8
    from 64 px (96 px: 12x12), else 4 (32 px: 8x8; 28 px: 7x7)."""
    return 16 if image_size >= 160 else 8 if image_size >= 64 else 4


class VisionTransformerEncoder(nn.Module):
    """torchvision's ``VisionTransformer`` as an encoder: the class token's final features.

    Other input sizes than the one built for (multi-crop's local views) work as in DINO: the
    position embeddings of the patch grid are interpolated (bicubic) to the input's grid, and a
    side that is not a multiple of the patch drops its last partial patch, as the strided patch
    convolution does. Parameters are torchvision's (``vit.conv_proj``, ``vit.class_token``,
    ``vit.encoder.*``), so a state dict loads into ``torchvision.models.VisionTransformer``."""

    def __init__(
        self, in_channels: int, image_size: int, patch_size: int, *, depth: int, heads: int, hidden: int, mlp: int
    ) -> None:
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer

        self.vit = VisionTransformer(image_size, patch_size, depth, heads, hidden, mlp)
        if in_channels != 3:
            conv = nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)
            # torchvision's initialization of the patch projection (LeCun normal, zero bias).
            nn.init.trunc_normal_(conv.weight, std=(1.0 / (in_channels * patch_size * patch_size)) ** 0.5)
            nn.init.zeros_(conv.bias)
            self.vit.conv_proj = conv
        self.vit.heads = nn.Identity()
        self.patch_size = patch_size
        self.image_size = image_size
        self.grid = image_size // patch_size

    def _position(self, rows: int, cols: int) -> Tensor:
        pos = self.vit.encoder.pos_embedding
        if (rows, cols) == (self.grid, self.grid):
            return pos
        cls, patches = pos[:, :1], pos[:, 1:]
        hidden = patches.shape[-1]
        grid = patches.reshape(1, self.grid, self.grid, hidden).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, rows * cols, hidden)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] < self.patch_size or x.shape[-2] < self.patch_size:
            raise ValueError(f"vit: input {tuple(x.shape)} is smaller than one {self.patch_size}x{self.patch_size} patch")
        vit = self.vit
        tokens = vit.conv_proj(x)
        rows, cols = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        tokens = torch.cat([vit.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = vit.encoder.dropout(tokens + self._position(rows, cols))
        return vit.encoder.ln(vit.encoder.layers(tokens))[:, 0]


def vit_small(in_channels: int = 1, image_size: int = 28, *, fused_stem: bool = True) -> tuple[nn.Module, int]:
    """ViT-S (12 layers, 6 heads, width 384, MLP 1536) with the patch size of
    :func:`vit_patch_size`; features ``(B, 384)`` (the class token). Any input size >= 8 px.
    ``fused_stem`` is accepted for the common signature; a ViT has no batch-norm stem to fuse."""
    _check("vit_small", in_channels, image_size, 8)
    module = VisionTransformerEncoder(
        in_channels, image_size, vit_patch_size(image_size), depth=12, heads=6, hidden=384, mlp=1536
    )
    return module, 384


BACKBONES: dict[str, BackboneFactory] = {
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vit_small": vit_small,
}


# What timm.create_model may be given for the input, most specific first: ViT-like models take the
# size they are built for (their position embeddings) and, for multi-crop's smaller local views, a
# dynamic size (position embeddings interpolated per input, as vit_small does); CNNs take neither.
_TIMM_SIZE_ARGUMENTS = ("img_size", "dynamic_img_size")


def timm_backbone(
    model: str, in_channels: int = 1, image_size: int = 28, *, fused_stem: bool = True
) -> tuple[nn.Module, int]:
    """timm's architecture ``model`` as an encoder: ``timm.create_model(model, pretrained=False,
    num_classes=0, in_chans=in_channels)``, randomly initialized (no weights are ever downloaded),
    built for ``image_size`` where the model takes an input size (ViTs, Swin: also with
    ``dynamic_img_size``, so that other input sizes work). Features: the pooled pre-logits that
    timm's model returns with ``num_classes=0``, of the size it reports (``head_hidden_size``,
    which is ``num_features`` unless the head has a hidden layer, as MobileNetV3's).
    ``fused_stem`` is accepted for the common signature; timm's layers are used as they are.

    Raises ImportError (timm not installed) or ValueError (a name timm does not know, with the
    closest names), both naming the backbone."""
    label = f"{TIMM_PREFIX}{model}"
    _check(label, in_channels, image_size, 1)
    try:
        import timm
    except ImportError as error:
        raise ImportError(
            f"backbone {label!r} needs the timm package, which is not installed here ({error}); "
            "install the `timm` extra: pip install -e '.[timm]' (or pip install timm)"
        ) from error
    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=3)
        hint = f"; closest: {', '.join(TIMM_PREFIX + c for c in close)}" if close else ""
        raise ValueError(f"backbone {label!r}: timm {timm.__version__} has no model {model!r}{hint}")
    size_arguments: dict[str, object] = {"img_size": image_size, "dynamic_img_size": True}
    while True:
        try:
            module = timm.create_model(model, pretrained=False, num_classes=0, in_chans=in_channels, **size_arguments)
            break
        except TypeError as error:
            # Drop the size arguments the model's constructor does not take, one at a time.
            refused = [key for key in _TIMM_SIZE_ARGUMENTS if key in size_arguments and repr(key) in str(error)]
            if not refused:
                raise
            del size_arguments[refused[0]]
    module.image_size = image_size  # what plain_copy rebuilds it for
    return module, int(getattr(module, "head_hidden_size", None) or module.num_features)


def build_backbone(
    name: str, in_channels: int = 1, image_size: int = 28, *, fused_stem: bool = True
) -> tuple[nn.Module, int]:
    """``BACKBONES[name](in_channels, image_size)``, or :func:`timm_backbone` for ``timm:NAME``,
    with a clear error for an unknown name."""
    model = timm_model_name(name)
    if model is not None:
        return timm_backbone(model, in_channels, image_size, fused_stem=fused_stem)
    if name not in BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; known backbones: {', '.join(sorted(BACKBONES))}, or {TIMM_PREFIX}NAME"
        )
    return BACKBONES[name](in_channels=in_channels, image_size=image_size, fused_stem=fused_stem)


def plain_copy(name: str, module: nn.Module) -> nn.Module:
    """The backbone ``name`` built with ``fused_stem=False`` and ``module``'s weights and running
    statistics: the same function with plain layer names (torchvision's ``conv1``/``bn1`` for
    resnet18, the seed's ``0``/``1`` for small_cnn), for a checkpoint used outside the harness."""
    stem = next(m for m in module.modules() if isinstance(m, ConvBatchNorm2d | nn.Conv2d))
    conv = stem.conv if isinstance(stem, ConvBatchNorm2d) else stem
    # The stem (resnets) and the position embeddings (ViT) depend on the size built for.
    plain, _ = build_backbone(name, conv.in_channels, int(getattr(module, "image_size", 32)), fused_stem=False)
    source = [*module.parameters(), *module.buffers()]
    target = [*plain.parameters(), *plain.buffers()]
    if [t.shape for t in source] != [t.shape for t in target]:
        raise ValueError(f"plain_copy: the module is not a {name} backbone (its tensors do not match one)")
    with torch.no_grad():
        for mine, theirs in zip(source, target, strict=True):
            theirs.copy_(mine)
    return plain.to(device=conv.weight.device, dtype=conv.weight.dtype).train(module.training)
