"""The knobs added for the issue-18 studies: SimSiam without stop-gradient or predictor, DINO's head
batch norm, evaluating the projection instead of the backbone (``eval_features``), and random
init with its batch-norm statistics recomputed on the images (``random_init_recompute_bn``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness import train
from harness.methods import METHODS, Method
from harness.spec import TrialConfig, resolve

TINY: dict[str, Any] = {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 8, "batch_size": 8, "dino_out_dim": 32}


def _build(**knobs: Any) -> tuple[TrialConfig, Method]:
    config = resolve({**TINY, **knobs})
    torch.manual_seed(0)
    return config, METHODS[config.method](config, in_channels=1, image_size=28, num_classes=4)


def _views() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(8, 1, 28, 28, generator=generator) for _ in range(2)]


def _expected_simsiam_loss(method: Method, views: list[torch.Tensor], stop_gradient: bool) -> torch.Tensor:
    """Chen & He 2021, eq. 3-4, written out: -(cos(p1, z2) + cos(p2, z1)) / 2 over one forward pass
    of both views (as the method batches them, so batch norm sees the same statistics)."""
    z1, z2 = method.projector(method.backbone(torch.cat(views))).chunk(2)
    p1, p2 = method.predictor(z1), method.predictor(z2)
    if stop_gradient:
        z1, z2 = z1.detach(), z2.detach()
    return -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2


def _backbone_gradient(method: Method, loss: torch.Tensor) -> list[torch.Tensor]:
    return torch.autograd.grad(loss, list(method.backbone.parameters()))


def test_simsiam__stop_gradient_knob_matches_the_formula_with_and_without_detach() -> None:
    views = _views()
    for stop_gradient in (True, False):
        _, method = _build(method="simsiam", simsiam_stop_gradient=stop_gradient)
        got = _backbone_gradient(method, method.training_loss(views, torch.zeros(8, dtype=torch.long)))
        want = _backbone_gradient(method, _expected_simsiam_loss(method, views, stop_gradient))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    # And the two settings really differ: the target branch's gradient is what stop-gradient cuts.
    _, method = _build(method="simsiam")
    with_sg = _backbone_gradient(method, _expected_simsiam_loss(method, views, True))
    without = _backbone_gradient(method, _expected_simsiam_loss(method, views, False))
    assert any(not torch.allclose(a, b) for a, b in zip(with_sg, without))


def test_simsiam__without_predictor_regresses_the_projection_directly() -> None:
    config, method = _build(method="simsiam", simsiam_predictor=False)
    assert isinstance(method.predictor, nn.Identity)
    views = _views()
    loss = method.training_loss(views, torch.zeros(8, dtype=torch.long))
    z1, z2 = method.projector(method.backbone(torch.cat(views))).chunk(2)
    torch.testing.assert_close(loss, -F.cosine_similarity(z1, z2).mean(), rtol=1e-5, atol=1e-6)
    # The published method keeps its predictor, and the default configuration hash is unchanged.
    assert resolve({"method": "simsiam"}).config_hash == resolve(
        {"method": "simsiam", "simsiam_stop_gradient": True, "simsiam_predictor": True}
    ).config_hash
    assert config.config_hash != resolve({**TINY, "method": "simsiam"}).config_hash


def test_dino__head_batch_norm_knob() -> None:
    def norms(method: Method) -> int:
        return sum(isinstance(m, nn.BatchNorm1d) for m in method.projector.modules())

    _, with_bn = _build(method="dino")
    _, without = _build(method="dino", dino_head_bn=False)
    assert norms(with_bn) == 2 and norms(without) == 0
    assert sum(isinstance(m, nn.BatchNorm1d) for m in with_bn.teacher_projector.modules()) == 2
    # DINO's declaration turns it on; every stored DINO trial from before keeps its hash (legacy false).
    assert resolve({"method": "dino"}).dino_head_bn is True


def test_eval_features__projector_evaluates_the_projection() -> None:
    knobs = {"dataset": "synthetic", "train_size": 32, "test_size": 16, "epochs": 0, "device": "cpu"}
    for features, width in (("backbone", None), ("projector", 16)):
        config = resolve({"method": "simclr", **TINY, **knobs, "eval_features": features})
        context = train._build(config, torch.device("cpu"))
        extracted = context.features(context.test)
        if width is None:
            assert extracted.shape[1] == context.method.feature_dim
        else:
            method = context.method
            method.eval()
            with torch.no_grad():
                mean = torch.as_tensor(context.test.mean, dtype=torch.float32).reshape(1, -1, 1, 1)
                std = torch.as_tensor(context.test.std, dtype=torch.float32).reshape(1, -1, 1, 1)
                x = (context.test.images.float() / 255 - mean) / std
                torch.testing.assert_close(extracted, method.embed(x), rtol=1e-4, atol=1e-5)
            assert extracted.shape[1] == width


def test_recompute_batch_norm__running_statistics_are_the_exact_batch_averages() -> None:
    from harness.evaluation import recompute_batch_norm

    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, bias=False)
    encoder = nn.Sequential(conv, nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.Flatten())
    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    weights = conv.weight.detach().clone()
    encoder.eval()
    assert recompute_batch_norm(encoder, images, mean=0.5, std=0.25, batch_size=4) == 1
    # Independently: the conv outputs of the identity views, batch by batch (3 equal batches).
    with torch.no_grad():
        outputs = conv((images.float() / 255 - 0.5) / 0.25).chunk(3)
    expected_mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outputs]).mean(0)
    expected_var = torch.stack([o.transpose(0, 1).reshape(4, -1).var(dim=1) for o in outputs]).mean(0)
    norm = encoder[1]
    torch.testing.assert_close(norm.running_mean, expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.running_var, expected_var, rtol=1e-5, atol=1e-6)
    assert norm.momentum == 0.3 and not encoder.training  # restored
    assert torch.equal(conv.weight, weights)


def test_random_init__recompute_bn_knob_calibrates_the_floor_and_only_it() -> None:
    knobs = {"dataset": "synthetic", "train_size": 64, "test_size": 32, "batch_size": 32, "device": "cpu", "method": "random_init"}
    initial = train._build(resolve(knobs), torch.device("cpu"))
    calibrated_config = resolve({**knobs, "random_init_recompute_bn": True})
    # Part of what the floor is (a configuration of its own), left out of every stored hash while false.
    assert calibrated_config.config_hash != resolve(knobs).config_hash
    assert resolve({**knobs, "random_init_recompute_bn": False}).config_hash == resolve(knobs).config_hash
    calibrated = train._build(calibrated_config, torch.device("cpu"))
    train._train(calibrated, {}, None, False)
    train._train(initial, {}, None, False)
    norms = [m for m in calibrated.method.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    untouched = [m for m in initial.method.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == 1 for m in norms)  # one batch of 64 images
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in untouched)
    assert not torch.allclose(norms[0].running_mean, torch.zeros_like(norms[0].running_mean))
    # The weights are the same random init: only the statistics moved.
    for a, b in zip(calibrated.method.backbone.parameters(), initial.method.backbone.parameters()):
        assert torch.equal(a, b)
    # A method that trains ignores the knob (it is random_init's).
    assert resolve({**knobs, "method": "simclr", "random_init_recompute_bn": True}).random_init_recompute_bn is False


def test_supervised__one_view_trains_on_the_first_view_only_and_makes_only_it() -> None:
    from harness.data.augment import make_views

    two_config, two = _build(method="supervised")
    one_config, one = _build(method="supervised", supervised_views=1)
    assert (two.n_views, one.n_views) == (2, 1)
    assert one_config.config_hash != two_config.config_hash
    assert resolve({"method": "supervised", "supervised_views": 2}).config_hash == resolve({"method": "supervised"}).config_hash
    views, labels = _views(), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    one.load_state_dict(two.state_dict())
    expected = F.cross_entropy(one.classifier(one.backbone(views[0])), labels)
    torch.testing.assert_close(one.training_loss(views, labels), expected)
    both = F.cross_entropy(two.classifier(two.backbone(torch.cat(views))), labels.repeat(2))
    torch.testing.assert_close(two.training_loss(views, labels), both)
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    made = make_views(images, "simclr", 1.0, n_views=1, generator=torch.Generator().manual_seed(0), mean=0.5, std=0.5)
    assert len(made) == 1 and made[0].shape == (8, 1, 28, 28)
    # The first view of a one-view call is the first view's recipe applied alone: at strength 0
    # (no randomness) it equals the two-view call's first view exactly.
    plain = [make_views(images, "simclr", 0.0, n_views=n, mean=0.5, std=0.5)[0] for n in (1, 2)]
    torch.testing.assert_close(plain[0], plain[1], rtol=0, atol=0)
