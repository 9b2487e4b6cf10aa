"""The knobs added for the issue-18 studies: SimSiam without stop-gradient or predictor, DINO's head
batch norm, and evaluating the projection instead of the backbone (``eval_features``)."""

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
