"""Backbone factories: output shapes, gradients, errors; the fused stem against its plain layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.backbones import BACKBONES, ConvBatchNorm2d, build_backbone

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
    assert module.conv1.conv.kernel_size == (3, 3) and module.conv1.conv.stride == (1, 1)
    assert isinstance(module.bn1, torch.nn.Identity)
    plain, _ = build_backbone("resnet18", 1, 28, fused_stem=False)
    assert plain.conv1.kernel_size == (3, 3) and isinstance(plain.bn1, torch.nn.BatchNorm2d)
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


def _plain_copy(fused: ConvBatchNorm2d) -> nn.Sequential:
    """The independent formula: the same weights in an ``nn.Conv2d`` then an ``nn.BatchNorm2d``."""
    conv = fused.conv
    plain = nn.Sequential(
        nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, bias=False),
        nn.BatchNorm2d(conv.out_channels, momentum=fused.bn.momentum),
    )
    plain.load_state_dict({
        "0.weight": conv.weight, **{f"1.{key}": value for key, value in fused.bn.state_dict().items()}
    })
    return plain


CONV_BN_CASES = [
    pytest.param(1, 32, 3, 1, 1, False, 0.1, id="grayscale-stem"),
    pytest.param(3, 64, 3, 1, 1, True, 0.1, id="rgb-stem-channels-last"),
    pytest.param(2, 24, 3, 2, 0, False, None, id="stride2-nopad-cumulative-momentum"),
    pytest.param(1, 16, 5, 1, 2, True, 0.3, id="5x5"),
    pytest.param(8, 16, 3, 1, 1, False, 0.1, id="not-folding"),
]
# In float64 the fused statistics and batch norm's agree to rounding; float32 adds ~1e-6 relative
# noise, which the weight gradient (a difference of large terms behind batch norm) amplifies.
EXACT = {"rtol": 1e-9, "atol": 1e-10}


@pytest.mark.parametrize(("cin", "cout", "kernel", "stride", "padding", "channels_last", "momentum"), CONV_BN_CASES)
def test_conv_batch_norm__equals_conv_then_batch_norm(
    cin: int, cout: int, kernel: int, stride: int, padding: int, channels_last: bool, momentum: float | None
) -> None:
    torch.manual_seed(0)
    fused = ConvBatchNorm2d(cin, cout, kernel, stride=stride, padding=padding)
    fused.bn.momentum = momentum
    with torch.no_grad():  # a non-trivial affine, one negative scale included
        fused.bn.weight.copy_(torch.linspace(-0.5, 2.0, cout))
        fused.bn.bias.copy_(torch.linspace(-1.0, 1.0, cout))
    plain = _plain_copy(fused)
    assert fused.folds_statistics == (cin * kernel * kernel < cout)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    fused = fused.to(torch.float64, memory_format=memory_format)
    plain = plain.to(torch.float64, memory_format=memory_format)
    for step in range(3):
        # Inputs with an offset and scale far from (0, 1), so the statistics are not trivial.
        x = (torch.randn(6, cin, 13, 13, dtype=torch.float64) * 3 + 2 + step).contiguous(memory_format=memory_format)
        x_fused, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_fused, out_plain = fused(x_fused), plain(x_plain)
        torch.testing.assert_close(out_fused, out_plain, **EXACT)
        upstream = torch.randn_like(out_plain)
        out_fused.backward(upstream)
        out_plain.backward(upstream)
        torch.testing.assert_close(x_fused.grad, x_plain.grad, **EXACT)
        pairs = [(fused.conv.weight, plain[0].weight), (fused.bn.weight, plain[1].weight),
                 (fused.bn.bias, plain[1].bias)]
        for mine, theirs in pairs:
            torch.testing.assert_close(mine.grad, theirs.grad, **EXACT)
    torch.testing.assert_close(fused.bn.running_mean, plain[1].running_mean, **EXACT)
    torch.testing.assert_close(fused.bn.running_var, plain[1].running_var, **EXACT)
    assert int(fused.bn.num_batches_tracked) == int(plain[1].num_batches_tracked) == 3
    fused.eval()
    plain.eval()
    x = torch.randn(4, cin, 13, 13, dtype=torch.float64).contiguous(memory_format=memory_format)
    torch.testing.assert_close(fused(x), plain(x), **EXACT)


def test_conv_batch_norm__float32_matches_to_rounding() -> None:
    torch.manual_seed(0)
    fused = ConvBatchNorm2d(1, 32).to(memory_format=torch.channels_last)
    plain = _plain_copy(fused).to(memory_format=torch.channels_last)
    x = (torch.randn(64, 1, 28, 28) * 0.5 + 0.3).contiguous(memory_format=torch.channels_last)
    out_fused, out_plain = fused(x), plain(x)
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-4, atol=1e-4)
    upstream = torch.randn_like(out_plain)
    out_fused.backward(upstream)
    out_plain.backward(upstream)
    scale = plain[0].weight.grad.abs().max()
    assert (fused.conv.weight.grad - plain[0].weight.grad).abs().max() <= 1e-3 * scale


def test_conv_batch_norm__statistics_stay_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    fused = ConvBatchNorm2d(1, 32)
    plain = _plain_copy(fused)
    x = torch.randn(8, 1, 12, 12) * 2 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_fused = fused(x)
    out_plain = plain(x)  # float32: the statistics the fused layer must reproduce
    assert out_fused.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits in the output; the running statistics are float32 and exact.
    torch.testing.assert_close(out_fused.float(), out_plain, rtol=0.05, atol=0.05)
    assert fused.bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(fused.bn.running_mean, plain[1].running_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.bn.running_var, plain[1].running_var, rtol=1e-4, atol=1e-5)


def test_conv_batch_norm__a_frozen_batch_norm_stays_frozen() -> None:
    # The usual idiom: the model trains, its batch norms are put in evaluation mode.
    torch.manual_seed(0)
    fused = ConvBatchNorm2d(1, 32)
    with torch.no_grad():
        fused.bn.running_mean.uniform_(-1, 1)
        fused.bn.running_var.uniform_(0.5, 2)
    plain = _plain_copy(fused).double()
    fused = fused.double()
    fused.train()
    fused.bn.eval()
    plain[1].eval()
    running = fused.bn.running_mean.clone()
    x = torch.randn(4, 1, 9, 9, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(fused(x), plain(x), **EXACT)
    assert torch.equal(fused.bn.running_mean, running) and int(fused.bn.num_batches_tracked) == 0


def test_conv_batch_norm__hooks_and_swapped_layers_see_the_layers_run() -> None:
    fused = ConvBatchNorm2d(1, 32)
    seen: list[tuple[int, ...]] = []
    handle = fused.bn.register_forward_hook(lambda _module, _inputs, output: seen.append(tuple(output.shape)))
    fused(torch.randn(2, 1, 6, 6))
    assert seen == [(2, 32, 6, 6)] and not fused.folds_statistics
    handle.remove()
    assert fused.folds_statistics
    fused.bn = nn.SyncBatchNorm(32)  # what convert_sync_batchnorm puts there
    assert not fused.folds_statistics


def test_conv_batch_norm__trains_as_a_bfloat16_module() -> None:
    torch.manual_seed(0)
    fused = ConvBatchNorm2d(1, 32)
    plain = _plain_copy(fused)
    fused, plain = fused.to(torch.bfloat16), plain.to(torch.bfloat16)
    x = torch.randn(8, 1, 12, 12, dtype=torch.bfloat16)
    out = fused(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), plain(x).float(), rtol=0.05, atol=0.05)


def test_conv_batch_norm__one_value_per_channel_is_refused_like_batch_norm() -> None:
    fused = ConvBatchNorm2d(1, 32, 3, padding=0)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fused(torch.randn(1, 1, 3, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        _plain_copy(fused)(torch.randn(1, 1, 3, 3))


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in BACKBONES])
def test_backbones__fused_stem_is_the_same_function(name: str) -> None:
    torch.manual_seed(0)
    fused, _ = BACKBONES[name](1, 28)
    plain, _ = BACKBONES[name](1, 28, fused_stem=False)
    fused, plain = fused.double(), plain.double()
    fused_tensors = [*fused.parameters(), *fused.buffers()]
    plain_tensors = [*plain.parameters(), *plain.buffers()]
    assert [t.shape for t in fused_tensors] == [t.shape for t in plain_tensors]
    with torch.no_grad():
        for mine, theirs in zip(fused_tensors, plain_tensors, strict=True):
            theirs.copy_(mine)
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64) * 0.5 + 0.3
    out_fused, out_plain = fused(x), plain(x)
    torch.testing.assert_close(out_fused, out_plain, **EXACT)
    out_fused.square().mean().backward()
    out_plain.square().mean().backward()
    for (pname, mine), theirs in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, **EXACT, msg=pname)
    for (bname, mine), theirs in zip(fused.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(mine, theirs, **EXACT, msg=bname)


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in BACKBONES])
def test_plain_copy__same_function_under_the_plain_layer_names(name: str) -> None:
    from harness.backbones import plain_copy

    torch.manual_seed(0)
    fused, _ = BACKBONES[name](1, 28)
    fused(torch.randn(8, 1, 28, 28))  # one training step's running statistics, so they are not the defaults
    fused.eval()
    plain = plain_copy(name, fused)
    assert not plain.training
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(plain(x), fused(x), rtol=1e-5, atol=1e-5)
    reference, _ = BACKBONES[name](1, 28, fused_stem=False)
    assert list(plain.state_dict()) == list(reference.state_dict())
    with pytest.raises(ValueError, match="not a"):
        plain_copy("resnet18" if name == "small_cnn" else "small_cnn", fused)


def test_plain_copy__resnet18_loads_into_torchvision() -> None:
    from torchvision.models import resnet18 as tv_resnet18

    from harness.backbones import plain_copy

    fused, _ = BACKBONES["resnet18"](1, 28)
    torchvision_model = tv_resnet18(weights=None)
    torchvision_model.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)
    torchvision_model.fc = nn.Identity()
    torchvision_model.load_state_dict(plain_copy("resnet18", fused).state_dict())  # strict: every key matches


# ----------------------------------------------------------------------------------------------
# resnet50 and vit_small


def test_backbones__resnet_stems_by_resolution() -> None:
    from harness.backbones import IMAGENET_STEM_MIN_SIZE

    small, dim = build_backbone("resnet50", 3, 32)
    assert dim == 2048 and small.conv1.conv.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    large, _ = build_backbone("resnet50", 3, IMAGENET_STEM_MIN_SIZE)
    assert large.conv1.conv.kernel_size == (7, 7) and large.conv1.conv.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)
    # RGB 7x7 patches (147 values) exceed the 64 channels: the fused layer runs the plain layers.
    assert not large.conv1.folds_statistics and build_backbone("resnet50", 1, 224)[0].conv1.folds_statistics
    out = large(torch.randn(2, 3, IMAGENET_STEM_MIN_SIZE, IMAGENET_STEM_MIN_SIZE))
    assert out.shape == (2, 2048)


def test_plain_copy__resnet50_imagenet_stem_loads_into_torchvision() -> None:
    from torchvision.models import resnet50 as tv_resnet50

    from harness.backbones import plain_copy

    fused, _ = build_backbone("resnet50", 3, 224)
    model = tv_resnet50(weights=None)
    model.fc = nn.Identity()
    model.load_state_dict(plain_copy("resnet50", fused).state_dict())  # strict: torchvision's own layout


@pytest.mark.parametrize(("size", "patch"), [(28, 4), (32, 4), (64, 8), (96, 8), (160, 16), (224, 16)])
def test_vit_patch_size__suits_the_resolution(size: int, patch: int) -> None:
    from harness.backbones import vit_patch_size

    assert vit_patch_size(size) == patch


def test_vit_small__equals_torchvision_vision_transformer() -> None:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    ours, dim = build_backbone("vit_small", 3, 32)
    reference = VisionTransformer(32, 4, 12, 6, 384, 1536)
    reference.heads = nn.Identity()
    reference.load_state_dict(ours.vit.state_dict())
    ours.eval(), reference.eval()
    x = torch.randn(2, 3, 32, 32)
    assert dim == 384
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


def test_vit_small__other_sizes_interpolate_the_position_embeddings() -> None:
    torch.manual_seed(0)
    vit, _ = build_backbone("vit_small", 1, 28)
    assert vit(torch.randn(2, 1, 12, 12)).shape == (2, 384)  # a multi-crop local view: 3x3 patches
    assert vit(torch.randn(2, 1, 14, 14)).shape == (2, 384)  # 14 px: the partial patch is dropped
    pos = vit._position(7, 7)
    assert pos is vit.vit.encoder.pos_embedding
    # Interpolating the 7x7 grid onto itself is the identity; onto 3x3 it keeps the class token.
    assert torch.equal(vit._position(3, 3)[:, 0], pos[:, 0])
    with pytest.raises(ValueError, match="smaller than one 4x4 patch"):
        vit(torch.randn(1, 1, 3, 3))


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet50", "vit_small", "timm:resnet18"])
def test_backbones__every_method_trains_and_embeds_with_the_new_backbones(backbone: str) -> None:
    """The method contract on small inputs: a finite loss, gradients in every backbone parameter,
    a state-dict round trip, and eval-mode features of the declared size (timm: where installed)."""
    if backbone.startswith("timm:"):
        _timm()
    from harness.data import make_views
    from harness.methods import METHODS
    from harness.spec import METHOD_NAMES, resolve

    labels = torch.tensor([0, 1, 0, 1])  # two images per class: SupCon has positives
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in METHOD_NAMES:
            config = resolve({
                "method": name, "backbone": backbone, "proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 16,
                "batch_size": 4, "swav_prototypes": 10, "dino_out_dim": 32,
                **({"queue_size": 16} if name == "moco" else {}),
                **({"local_crops": 2} if name in ("swav", "dino") else {}),
            })
            torch.manual_seed(0)
            method = METHODS[name](config, in_channels=1, image_size=16, num_classes=2)
            generator = torch.Generator().manual_seed(0)
            images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8, generator=generator)
            views = make_views(images, method.view_recipe, 1.0, n_local=method.n_local_crops, generator=generator)
            if method.trainable:
                method.on_train_start(10, 5)
                loss = method.training_loss(views, labels)
                assert torch.isfinite(loss), name
                loss.backward()
                for pname, param in method.backbone.named_parameters():
                    assert param.grad is not None and torch.isfinite(param.grad).all(), (name, pname)
            clone = METHODS[name](config, in_channels=1, image_size=16, num_classes=2)
            clone.load_state_dict(method.state_dict())
            method.eval(), clone.eval()
            with torch.no_grad():
                features = method.backbone(views[0])
                assert features.shape == (4, {"resnet50": 2048, "vit_small": 384, "timm:resnet18": 512}[backbone])
                assert torch.equal(features, clone.backbone(views[0])), name
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# timm:NAME backbones (the optional `timm` extra; skipped where timm is not installed)

# A CNN, a ViT (built for its input size, dynamic sizes allowed) and a model whose pooled features
# come out of a hidden head layer (MobileNetV3: head_hidden_size 1024 != num_features 288).
TIMM_MODELS = ("resnet18", "vit_tiny_patch16_224", "mobilenetv3_small_050")


def _timm() -> object:
    return pytest.importorskip("timm", reason="the timm extra is not installed")


@pytest.mark.parametrize("model", TIMM_MODELS)
@pytest.mark.parametrize("channels", [1, 3])
def test_timm_backbone__contract(model: str, channels: int) -> None:
    """Features of the declared size (what timm's own model returns with num_classes=0), finite,
    gradients in every parameter; random initialization, reproducible from the torch seed."""
    timm = _timm()
    torch.manual_seed(0)
    module, dim = build_backbone(f"timm:{model}", channels, 32)
    x = torch.randn(2, channels, 32, 32)
    out = module(x)
    assert out.shape == (2, dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
    reference = timm.create_model(model, pretrained=False, num_classes=0, in_chans=channels, **(
        {"img_size": 32} if "vit" in model else {}))
    assert reference(x).shape == (2, dim)
    out.square().mean().backward()
    for pname, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
    torch.manual_seed(0)
    again, _ = build_backbone(f"timm:{model}", channels, 32)
    torch.manual_seed(1)
    other, _ = build_backbone(f"timm:{model}", channels, 32)
    first = next(module.parameters())
    assert torch.equal(first, next(again.parameters())) and not torch.equal(first, next(other.parameters()))


def test_timm_backbone__never_loads_pretrained_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    timm = _timm()
    calls: list[dict[str, object]] = []
    create = timm.create_model

    def spy(name: str, **kwargs: object) -> nn.Module:
        calls.append(kwargs)
        return create(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    build_backbone("timm:resnet18", 3, 32)
    resnet_calls = len(calls)
    build_backbone("timm:vit_tiny_patch16_224", 3, 32)
    assert calls and all(kwargs["pretrained"] is False and kwargs["num_classes"] == 0 for kwargs in calls)
    # The ResNet's constructor takes no size (the size arguments are dropped one by one after its
    # TypeErrors); the ViT takes the input size and dynamic sizes at the first try.
    assert calls[resnet_calls - 1].keys() == {"pretrained", "num_classes", "in_chans"}
    assert len(calls) == resnet_calls + 1
    assert {"img_size": 32, "dynamic_img_size": True}.items() <= calls[-1].items()


def test_timm_backbone__vit_takes_other_input_sizes() -> None:
    """Multi-crop's local views are smaller than the size built for: timm interpolates the
    position embeddings (dynamic_img_size), as vit_small does."""
    _timm()
    module, dim = build_backbone("timm:vit_tiny_patch16_224", 3, 64)
    assert module(torch.randn(2, 3, 32, 32)).shape == module(torch.randn(2, 3, 64, 64)).shape == (2, dim)


def test_timm_backbone__unknown_name_names_the_backbone_and_close_names() -> None:
    timm = _timm()
    with pytest.raises(ValueError, match=r"backbone 'timm:resnet19': timm .* has no model 'resnet19'; closest: .*timm:resnet18"):
        build_backbone("timm:resnet19")
    assert timm.is_model("resnet18")


def test_timm_backbone__without_timm_names_the_backbone_and_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` meets where it is not installed
    with pytest.raises(ImportError, match=r"backbone 'timm:resnet18' needs the timm package.*the `timm` extra"):
        build_backbone("timm:resnet18", 3, 32)


def test_timm_backbone__bad_arguments() -> None:
    with pytest.raises(ValueError, match="timm:resnet18: in_channels"):
        build_backbone("timm:resnet18", 0, 32)


def test_run_trial__unusable_timm_backbone_is_a_failed_trial_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from harness import train
    from harness.spec import resolve

    monkeypatch.setitem(sys.modules, "timm", None)
    config = resolve({
        "dataset": "synthetic", "backbone": "timm:resnet18", "epochs": 1, "batch_size": 16, "train_size": 64,
        "test_size": 32, "proj_hidden_dim": 16, "proj_dim": 8,
    })
    record = train.run_trial(config, progress=False)
    assert record.status == "failed"
    assert "backbone 'timm:resnet18' needs the timm package" in record.reason


def test_plain_copy__timm_backbone_loads_into_timms_own_model() -> None:
    """The encoder file's tensors load, strictly, into the model timm builds from its name."""
    timm = _timm()
    from harness.backbones import plain_copy

    torch.manual_seed(0)
    module, _ = build_backbone("timm:resnet18", 1, 28)
    module(torch.randn(4, 1, 28, 28))
    module.eval()
    plain = plain_copy("timm:resnet18", module)
    theirs = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1).eval()
    theirs.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(theirs(x), module(x))
