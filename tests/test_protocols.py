"""harness.protocols: label fractions (balance, nesting, independence from the pre-training subset),
few-shot draws, input adaptation, fine-tuning against the frozen probe, and whole tasks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from harness import evaluation, protocols
from harness.backbones import small_cnn
from harness.data import DATASETS, ImageDataset, balanced_subset_indices
from harness.protocol_spec import FineTune, head_init_of, parse_evaluate


def _labels(n: int = 6000, classes: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def test_label_fraction_indices__class_balanced_deterministic_and_nested() -> None:
    labels = _labels()
    one = protocols.label_fraction_indices(labels, 0.01, seed=0)
    ten = protocols.label_fraction_indices(labels, 0.1, seed=0)
    assert torch.bincount(labels[one], minlength=10).tolist() == [6] * 10  # round(0.01 * 6000 / 10)
    assert torch.bincount(labels[ten], minlength=10).tolist() == [60] * 10
    assert set(one.tolist()) <= set(ten.tolist())
    assert torch.equal(one, protocols.label_fraction_indices(labels, 0.01, seed=0))
    assert not torch.equal(one, protocols.label_fraction_indices(labels, 0.01, seed=1))
    assert torch.equal(protocols.label_fraction_indices(labels, 1.0, seed=3), torch.arange(6000))


def test_label_fraction_indices__a_small_class_gives_what_it_has_and_bad_fraction() -> None:
    labels = torch.tensor([0] * 100 + [1] * 3)
    index = protocols.label_fraction_indices(labels, 0.5, seed=0)
    assert torch.bincount(labels[index]).tolist() == [26, 3]  # round(0.5 * 103 / 2) = 26
    assert protocols.label_fraction_indices(labels, 0.001, seed=0).numel() == 2  # at least one per class
    with pytest.raises(ValueError, match="fraction must be in"):
        protocols.label_fraction_indices(labels, 0.0, seed=0)


def test_label_fraction_indices__independent_of_the_pretraining_subset() -> None:
    """The trial pre-trains on balanced_subset_indices(seed=0); a label fraction drawn from that
    same stream would lie inside it (the subsets are nested). The fraction's overlap with the
    pre-training subset is what independent draws give: |F| * |S| / N on average."""
    labels = _labels(20000)
    pretraining = set(balanced_subset_indices(labels, 5000, seed=protocols.SUBSET_SEED).tolist())
    dependent = set(balanced_subset_indices(labels, 2000, seed=protocols.SUBSET_SEED).tolist())
    assert dependent <= pretraining  # the pitfall the separate stream avoids
    fraction = set(protocols.label_fraction_indices(labels, 0.1, seed=0).tolist())
    overlap = len(fraction & pretraining)
    expected = len(fraction) * 5000 / 20000  # 500
    # Hypergeometric sd ~ sqrt(2000 * 0.25 * 0.75 * 18000 / 19999) = 18.4; 5 sd either side.
    assert abs(overlap - expected) < 5 * 18.4


def test_subset_seed__equals_the_trainers() -> None:
    from harness.train import SUBSET_SEED

    assert protocols.SUBSET_SEED == SUBSET_SEED


def test_few_shot_indices__shots_per_class_and_distinct_draws() -> None:
    labels = _labels(500)
    first = protocols.few_shot_indices(labels, 3, seed=0, draw=0)
    assert torch.bincount(labels[first], minlength=10).tolist() == [3] * 10
    assert not torch.equal(first, protocols.few_shot_indices(labels, 3, seed=0, draw=1))
    with pytest.raises(ValueError, match="fewer than 9999 shots"):
        protocols.few_shot_indices(labels, 9999, seed=0, draw=0)


def test_few_shot_knn__matches_knn_on_each_draws_support() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=generator)
    centers = torch.randn(4, 16, generator=generator)
    features = centers[labels] + 0.8 * torch.randn(200, 16, generator=generator)
    test_labels = torch.randint(0, 4, (100,), generator=generator)
    test = centers[test_labels] + 0.8 * torch.randn(100, 16, generator=generator)
    accuracies = protocols.few_shot_knn(features, labels, test, test_labels, shots=2, draws=3, seed=5, num_classes=4, t=0.1)
    assert len(accuracies) == 3
    for draw, accuracy in enumerate(accuracies):
        index = protocols.few_shot_indices(labels, 2, seed=5, draw=draw)
        expected = evaluation.knn_top1(features[index], labels[index], test, test_labels, k=8, t=0.1, num_classes=4)
        assert accuracy == expected
    assert min(accuracies) > 0.5  # well-separated centres: far above chance (0.25)


def test_adapt_images__rgb_to_gray_resize_and_gray_to_rgb() -> None:
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    adapted, text = protocols.adapt_images(images, channels=1, size=28)
    assert adapted.shape == (4, 1, 28, 28) and adapted.dtype == torch.uint8
    assert text == "channels 3 -> 1 (ITU-R 601 luma); resize 16x16 -> 28x28 (bilinear, antialiased)"
    gray, _ = protocols.adapt_images(images, channels=1, size=16)
    luma = 0.2989 * images[:, 0].double() + 0.587 * images[:, 1].double() + 0.114 * images[:, 2].double()
    assert torch.equal(gray[:, 0], luma.round().clamp(0, 255).to(torch.uint8))
    rgb, text = protocols.adapt_images(gray, channels=3, size=16)
    assert text == "channels 1 -> 3 (gray repeated)" and torch.equal(rgb[:, 2], gray[:, 0])
    same, text = protocols.adapt_images(gray, channels=1, size=16)
    assert text == "none" and torch.equal(same, gray)
    with pytest.raises(ValueError, match="cannot adapt 3-channel"):
        protocols.adapt_images(images, channels=2, size=16)


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images whose class is which of 4 horizontal bands is bright: learnable by a small CNN
    and unchanged by a horizontal flip (the fine-tuning augmentation)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = torch.randint(0, 60, (n, 1, 16, 16), dtype=torch.uint8, generator=generator)
    for i, label in enumerate(labels.tolist()):
        images[i, 0, label * 4 : label * 4 + 4, 2:14] = 230
    return images, labels


def test_fine_tune__updates_a_copy_of_the_encoder_while_the_probe_leaves_it_alone() -> None:
    torch.manual_seed(0)
    encoder, _ = small_cnn(1, 16)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    train_images, train_labels = _blobs(64, 0)
    test_images, test_labels = _blobs(64, 1)
    result = protocols.fine_tune(
        encoder, train_images, train_labels, test_images, test_labels,
        num_classes=4, mean=(0.3,), std=(0.3,), epochs=6, lr=0.5, backbone_lr_scale=0.1, batch_size=16,
    )
    # The encoder passed in is untouched; the fine-tuned copy moved, every layer with parameters.
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    tuned = dict(result.encoder.named_parameters())
    moved = [name for name, p in encoder.named_parameters() if not torch.allclose(p, tuned[name])]
    assert len(moved) == len(list(encoder.parameters()))
    assert result.steps == 6 * 4 and result.top1 > 0.6  # one bright band: far above chance (0.25)

    # The linear probe trains on cached features: the encoder's parameters and buffers stay.
    features = evaluation.extract_features(encoder, train_images, mean=0.3, std=0.3)
    test_features = evaluation.extract_features(encoder, test_images, mean=0.3, std=0.3)
    evaluation.linear_probe(features, train_labels, test_features, test_labels, num_classes=4, epochs=5)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_fine_tune__backbone_scale_zero_freezes_the_encoder_parameters() -> None:
    torch.manual_seed(0)
    encoder, _ = small_cnn(1, 16)
    images, labels = _blobs(32, 2)
    result = protocols.fine_tune(
        encoder, images, labels, images, labels,
        num_classes=4, mean=(0.3,), std=(0.3,), epochs=2, lr=0.5, backbone_lr_scale=0.0, batch_size=16,
    )
    tuned = dict(result.encoder.named_parameters())
    assert all(torch.equal(p, tuned[name]) for name, p in encoder.named_parameters())
    assert result.head.weight.abs().sum() > 0


def test_linear_head__is_the_probes_classifier_with_the_standardization_folded_in() -> None:
    generator = torch.Generator().manual_seed(3)
    labels = torch.arange(48) % 3
    noise = torch.randn(48, 6, generator=generator)
    noise[:, :3] += 1.5 * F.one_hot(labels, 3)  # classes overlap a little: the probe is not perfect
    features = noise * torch.tensor([0.1, 1.0, 5.0, 0.5, 2.0, 1e-3]) + 3.0
    head = evaluation.linear_head(features, labels, num_classes=3, epochs=4, seed=1)
    classifier, mean, std = evaluation._fit_probe(features, labels, 3, 4, 256, 0.1, 0.0, 1)
    # Independently in float64: the probe's logits on standardized features.
    x = features.double()
    expected = ((x - mean.double()) / std.double()) @ classifier.weight.double().T + classifier.bias.double()
    got = x @ head.weight.double().T + head.bias.double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # The same fit as linear_probe's: its top-1 is this head's accuracy.
    top1, _ = evaluation.linear_probe(features, labels, features, labels, num_classes=3, epochs=4, seed=1)
    assert top1 == (head(features).argmax(dim=1) == labels).float().mean().item()
    # A relative floor: the feature of spread 1e-3 (median ~1) is ignored, the others are fitted.
    floored = evaluation.linear_head(features, labels, num_classes=3, epochs=4, seed=1, relative_std_floor=0.1)
    assert torch.all(floored.weight[:, 5] == 0) and torch.all(floored.weight[:, :5] != 0)
    assert not torch.all(head.weight[:, 5] == 0)


def test_fine_tune__probe_head_init_starts_at_the_probes_fit_and_still_moves_the_encoder() -> None:
    torch.manual_seed(0)
    encoder, _ = small_cnn(1, 16)
    images, labels = _blobs(32, 3)
    result = protocols.fine_tune(
        encoder, images, labels, images, labels, num_classes=4, mean=(0.3,), std=(0.3,), epochs=2, lr=0.5,
        backbone_lr_scale=0.1, batch_size=16, head_init="probe", probe_epochs=3, seed=2,
    )
    features = evaluation.extract_features(encoder, images, mean=(0.3,), std=(0.3,))
    probe = evaluation.linear_head(
        features, labels, num_classes=4, epochs=3, seed=2, relative_std_floor=protocols.PROBE_RELATIVE_STD_FLOOR
    )
    assert torch.equal(result.initial_head.weight, probe.weight) and torch.equal(result.initial_head.bias, probe.bias)
    assert not torch.equal(result.head.weight, probe.weight)
    tuned = dict(result.encoder.named_parameters())
    assert all(not torch.allclose(p, tuned[name]) for name, p in encoder.named_parameters())
    zero = protocols.fine_tune(
        encoder, images, labels, images, labels, num_classes=4, mean=(0.3,), std=(0.3,), epochs=1, lr=0.5,
        backbone_lr_scale=0.1, batch_size=16, head_init="zero",
    )
    assert zero.initial_head.weight.abs().sum() == 0 and zero.initial_head.bias.abs().sum() == 0
    with pytest.raises(ValueError, match="head_init must be one of probe, zero, got 'warm'"):
        protocols.fine_tune(
            encoder, images, labels, images, labels, num_classes=4, mean=(0.3,), std=(0.3,), epochs=1, lr=0.5,
            backbone_lr_scale=0.1, head_init="warm",
        )


def test_tsne_embedding__two_coordinates_per_point_and_deterministic() -> None:
    features = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(60) % 3
    first = protocols.tsne_embedding(features, labels, perplexity=30.0)
    assert len(first["x"]) == len(first["y"]) == 60 and first["label"][:4] == [0, 1, 2, 0]
    assert first["perplexity"] == pytest.approx(59 / 3)
    assert first == protocols.tsne_embedding(features, labels, perplexity=30.0)


def _tiny_rgb(split: str, *, root: object = None, download: bool = False) -> ImageDataset:
    """A 3-channel 12x12 target for transfer: the class is which channel is bright."""
    n = 60 if split == "train" else 30
    labels = torch.arange(n) % 3
    images = torch.full((n, 3, 12, 12), 20, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, label] = 200 + (i % 7)
    return ImageDataset(images, labels, 3, "tiny-rgb", split, (0.4, 0.4, 0.4), (0.3, 0.3, 0.3), ("r", "g", "b"))


@pytest.mark.slow
def test_run_task__every_protocol_on_digits_and_a_transfer_with_adaptation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DATASETS, "tiny-rgb", _tiny_rgb)
    plan, problems = parse_evaluate(
        {
            "linear": {"fractions": [0.05], "epochs": 5},
            "finetune": {"fractions": [0.05], "epochs": 2},
            "few_shot": {"shots": [1], "draws": 2},
            "transfer": [{"dataset": "tiny-rgb", "protocols": ["knn", "linear", "finetune"]}],
            "embedding": {"points": 40},
        },
        datasets=[*DATASETS],
    )
    assert problems == [] and plan is not None
    torch.manual_seed(0)
    encoder, _ = small_cnn(1, 28)
    config = {"dataset": "digits", "test_size": 100, "knn_k": 20, "knn_t": 0.1, "linear_epochs": 10, "seed": 0}
    results = {(t.protocol, t.dataset): protocols.run_task(t, encoder, config) for t in plan.tasks()}
    linear = results[("linear", None)]
    assert linear.n_train == 70 and linear.n_test == 100 and linear.epochs == 5  # round(0.05 * 1437 / 10) = 7 per class
    fine = results[("finetune", None)]
    assert fine.n_train == 70 and fine.epochs == 2 and fine.details["backbone_lr_scale_used"] == FineTune.backbone_lr_scale
    few = results[("few_shot_knn", None)]
    assert few.n_train == 10 and len(few.details["per_draw"]) == 2
    assert few.top1 == pytest.approx(sum(few.details["per_draw"]) / 2)
    assert few.spread == pytest.approx(float(torch.tensor(few.details["per_draw"], dtype=torch.float64).std()))
    transfer = results[("knn", "tiny-rgb")]
    assert transfer.details["adaptation"].startswith("channels 3 -> 1 (ITU-R 601 luma); resize 12x12 -> 28x28")
    assert transfer.n_train == 60 and transfer.n_test == 30
    assert results[("finetune", "tiny-rgb")].n_train == 60
    embedding = results[("embedding", None)]
    assert len(embedding.details["x"]) == 40 and embedding.details["class_names"][0] == "0"
    for result in results.values():
        assert result.top1 is None or 0.0 <= result.top1 <= 1.0
    # From scratch (random_init): every layer at the full rate.
    scratch = protocols.run_task(plan.tasks()[1], encoder, config, from_scratch=True)
    assert scratch.details["backbone_lr_scale_used"] == 1.0 and scratch.details["from_scratch"] is True
    assert not math.isnan(scratch.top1 or math.nan)


def test_parse_evaluate__tasks_and_problems() -> None:
    plan, problems = parse_evaluate(
        {"finetune": {"fractions": [0.1, 0.01]}, "few_shot": {"shots": [5, 1]}, "transfer": {"dataset": "digits"}},
        datasets=["digits", "mnist"],
    )
    assert problems == [] and plan is not None
    tasks = plan.tasks()
    assert [(t.protocol, t.fraction, t.shots, t.dataset) for t in tasks] == [
        ("finetune", 0.01, None, None),
        ("finetune", 0.1, None, None),
        ("few_shot_knn", None, 1, None),
        ("few_shot_knn", None, 5, None),
        ("knn", None, None, "digits"),
        ("linear", 1.0, None, "digits"),
    ]
    assert tasks[0].setting("backbone_lr_scale") == 0.1 and tasks[0].label_seed == 0
    assert len({t.key for t in tasks}) == len(tasks)
    _, problems = parse_evaluate(
        {"finetune": {"fractions": [0, 2], "lr": -1, "bogus": 1}, "transfer": [{"dataset": "nope"}], "few_shot": 3},
        datasets=["digits"],
    )
    paths = [p for p, _ in problems]
    assert sorted(paths) == [
        "evaluate.few_shot",
        "evaluate.finetune.bogus",
        "evaluate.finetune.fractions[0]",
        "evaluate.finetune.fractions[1]",
        "evaluate.finetune.lr",
        "evaluate.transfer[0].dataset",
    ]
    assert parse_evaluate({}, datasets=[])[1] == [
        ("evaluate", "declares no protocol; expected at least one of linear, finetune, few_shot, transfer, embedding")
    ]


def test_parse_evaluate__head_init_default_probe_zero_keeps_the_stored_key_and_bad_values() -> None:
    plan, _ = parse_evaluate({"finetune": {"fractions": [0.01]}}, datasets=[])
    assert plan is not None and plan.tasks()[0].setting("head_init") == "probe"
    plan, _ = parse_evaluate(
        {"finetune": {"fractions": [0.01], "epochs": 5, "batch_size": 64, "lr": 0.4, "head_init": "zero"}}, datasets=[]
    )
    assert plan is not None
    # The key a fine-tuning task had before head_init existed (as stored in harness_evaluation).
    assert plan.tasks()[0].key == (
        '{"dataset":null,"fraction":0.01,"label_seed":0,"protocol":"finetune","settings":{"augment":true,'
        '"backbone_lr_scale":0.1,"batch_size":64,"epochs":5,"lr":0.4},"shots":null}'
    )
    stored = json.loads(plan.tasks()[0].key)["settings"]
    assert head_init_of(stored) == "zero" and head_init_of({**stored, "head_init": "probe"}) == "probe"
    _, problems = parse_evaluate({"finetune": {"head_init": "warm"}}, datasets=[])
    assert problems == [("evaluate.finetune.head_init", "expected one of probe, zero, found 'warm'")]
