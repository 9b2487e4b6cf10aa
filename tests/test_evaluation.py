"""harness.evaluation: k-NN against a brute-force loop, the linear probe on separable data, RankMe,
feature std, feature extraction, alignment/uniformity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from harness import evaluation


def _features(seed: int, n: int, dim: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    centers = torch.randn(num_classes, dim, generator=generator)
    features = centers[labels] + 1.5 * torch.randn(n, dim, generator=generator)
    return features, labels


def _brute_force_knn(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, k: int, t: float, num_classes: int
) -> list[int]:
    """Wu et al. 2018's weighted vote, one test sample at a time, in plain Python floats."""
    train_rows = train.double().tolist()
    predictions = []
    for row in test.double().tolist():
        row_norm = math.sqrt(sum(v * v for v in row))
        sims = []
        for j, other in enumerate(train_rows):
            other_norm = math.sqrt(sum(v * v for v in other))
            sims.append((sum(a * b for a, b in zip(row, other)) / (row_norm * other_norm), j))
        sims.sort(key=lambda pair: -pair[0])
        votes = [0.0] * num_classes
        for sim, j in sims[: min(k, len(sims))]:
            votes[int(train_labels[j])] += math.exp(sim / t)
        predictions.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return predictions


@pytest.mark.parametrize(
    ("seed", "k", "t"), [(0, 5, 0.1), (1, 20, 0.07), (2, 1, 0.5), (3, 200, 0.1), (4, 20, 0.005), (5, 60, 0.002)]
)
def test_knn_predict__matches_brute_force_loop(seed: int, k: int, t: float) -> None:
    train, train_labels = _features(seed, 60, 8, 4)
    test, _ = _features(seed + 100, 25, 8, 4)
    predictions = evaluation.knn_predict(train, train_labels, test, k=k, t=t, num_classes=4, chunk_size=7)
    assert predictions.tolist() == _brute_force_knn(train, train_labels, test, k, t, 4)


def test_knn_predict__small_temperature_does_not_overflow_the_votes() -> None:
    # exp(sim / 0.01) overflows float32 for sim > 0.89: every vote would be inf and tie at class 0.
    train = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.99, 0.05], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    assert evaluation.knn_predict(train, labels, query, k=3, t=0.01, num_classes=2).tolist() == [1]


def test_knn_top1__matches_brute_force_accuracy() -> None:
    train, train_labels = _features(5, 80, 6, 5)
    test, test_labels = _features(6, 40, 6, 5)
    expected = _brute_force_knn(train, train_labels, test, 10, 0.1, 5)
    accuracy = sum(int(p == y) for p, y in zip(expected, test_labels.tolist())) / 40
    got = evaluation.knn_top1(train, train_labels, test, test_labels, k=10, t=0.1, num_classes=5)
    assert got == pytest.approx(accuracy)


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 4096])
def test_knn_top1__chunking_invariant(chunk_size: int) -> None:
    train, train_labels = _features(7, 200, 16, 10)
    test, test_labels = _features(8, 50, 16, 10)
    reference = evaluation.knn_predict(train, train_labels, test, k=20, num_classes=10, chunk_size=50)
    chunked = evaluation.knn_predict(train, train_labels, test, k=20, num_classes=10, chunk_size=chunk_size)
    assert torch.equal(reference, chunked)
    accuracy = evaluation.knn_top1(
        train, train_labels, test, test_labels, k=20, num_classes=10, chunk_size=chunk_size
    )
    assert accuracy == pytest.approx((reference == test_labels).float().mean().item())


def test_knn_top1__k_clipped_to_train_size() -> None:
    train, train_labels = _features(9, 12, 4, 3)
    test, test_labels = _features(10, 9, 4, 3)
    clipped = evaluation.knn_top1(train, train_labels, test, test_labels, k=200, num_classes=3)
    exact = evaluation.knn_top1(train, train_labels, test, test_labels, k=12, num_classes=3)
    assert clipped == exact


def test_knn_top1__separated_clusters_perfect() -> None:
    labels = torch.arange(4).repeat_interleave(10)
    features = torch.eye(4)[labels] * 10 + 0.1 * torch.randn(
        40, 4, generator=torch.Generator().manual_seed(0)
    )
    assert evaluation.knn_top1(features, labels, features, labels, k=5, num_classes=4) == 1.0


def _separable(seed: int, n: int, dim: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels from a random linear map with a margin; features at an arbitrary offset and scale,
    which the probe's standardization must absorb."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, num_classes, generator=generator)
    x = torch.randn(4 * n, dim, generator=generator)
    scores = x @ weight
    top2 = scores.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > 0.5
    x, labels = x[keep][:n], scores[keep][:n].argmax(dim=1)
    return 50.0 + 20.0 * x, labels


def test_linear_probe__separable_data_high_accuracy() -> None:
    train, train_labels = _separable(0, 2000, 32, 10)
    test, test_labels = train[1500:], train_labels[1500:]
    train, train_labels = train[:1500], train_labels[:1500]
    top1, top5 = evaluation.linear_probe(
        train, train_labels, test, test_labels, num_classes=10, epochs=50, seed=0
    )
    assert top1 >= 0.95
    assert top5 >= top1
    assert top5 >= 0.99


def test_linear_probe__same_seed_same_result() -> None:
    train, train_labels = _features(11, 300, 16, 5)
    test, test_labels = _features(12, 100, 16, 5)
    runs = [
        evaluation.linear_probe(
            train, train_labels, test, test_labels, num_classes=5, epochs=3, batch_size=32, seed=4
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_linear_probe__works_under_no_grad() -> None:
    train, train_labels = _features(14, 100, 8, 3)
    expected = evaluation.linear_probe(train, train_labels, train, train_labels, num_classes=3, epochs=2)
    with torch.no_grad():
        assert (
            evaluation.linear_probe(train, train_labels, train, train_labels, num_classes=3, epochs=2)
            == expected
        )


def test_linear_probe__restores_thread_count() -> None:
    threads = torch.get_num_threads()
    train, train_labels = _features(15, 50, 4, 2)
    evaluation.linear_probe(train, train_labels, train, train_labels, num_classes=2, epochs=1)
    assert torch.get_num_threads() == threads


def test_linear_probe__top5_of_fewer_classes_is_all() -> None:
    train, train_labels = _features(13, 60, 4, 3)
    _, top5 = evaluation.linear_probe(train, train_labels, train, train_labels, num_classes=3, epochs=1)
    assert top5 == 1.0


def test_linear_probe__collapsed_features_finite_chance() -> None:
    features = torch.ones(40, 8)
    labels = torch.arange(4).repeat(10)
    top1, top5 = evaluation.linear_probe(features, labels, features, labels, num_classes=4, epochs=2)
    assert math.isfinite(top1)
    assert top1 == pytest.approx(0.25)
    assert top5 == 1.0


@pytest.mark.parametrize("dim", [1, 8, 32])
def test_effective_rank__identity_is_dimension(dim: int) -> None:
    assert evaluation.effective_rank(torch.eye(dim)) == pytest.approx(dim, rel=1e-4)


def test_effective_rank__orthonormal_columns_is_dimension() -> None:
    q, _ = torch.linalg.qr(torch.randn(100, 16, generator=torch.Generator().manual_seed(0)))
    assert evaluation.effective_rank(3.0 * q) == pytest.approx(16, rel=1e-4)


def test_effective_rank__rank_one_is_one() -> None:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(200, 1, generator=generator) @ torch.randn(1, 64, generator=generator)
    assert evaluation.effective_rank(features) == pytest.approx(1.0, abs=1e-3)


def test_effective_rank__zero_features_zero() -> None:
    assert evaluation.effective_rank(torch.zeros(10, 4)) == 0.0


def test_feature_std__collapsed_is_zero() -> None:
    features = torch.randn(1, 32).repeat(50, 1) * 7.0
    assert evaluation.feature_std(features) == pytest.approx(0.0, abs=1e-6)


def test_feature_std__spread_is_inverse_sqrt_dim() -> None:
    features = torch.randn(20000, 64, generator=torch.Generator().manual_seed(2))
    assert evaluation.feature_std(features) == pytest.approx(1 / math.sqrt(64), rel=0.02)


def test_alignment_uniformity__identical_views_align() -> None:
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    alignment, uniformity = evaluation.alignment_uniformity(z, 5.0 * z)
    assert alignment == pytest.approx(0.0, abs=1e-6)
    assert uniformity < 0.0
    alignment_other, _ = evaluation.alignment_uniformity(z, torch.randn(64, 16))
    assert alignment_other > 0.5


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_extract_features__identity_view_in_eval_mode() -> None:
    torch.manual_seed(0)
    encoder = _Encoder()
    encoder(torch.randn(16, 2, 8, 8))  # give BN non-trivial running statistics
    encoder.train()
    images = torch.randint(
        0, 256, (10, 2, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    mean, std = (0.3, 0.6), (0.2, 0.4)
    features = evaluation.extract_features(encoder, images, mean=mean, std=std, batch_size=3)
    assert encoder.training, "the encoder's training mode is restored"
    encoder.eval()
    expected_input = (images.float() / 255 - torch.tensor(mean).view(1, 2, 1, 1)) / torch.tensor(std).view(
        1, 2, 1, 1
    )
    with torch.no_grad():
        expected = encoder(expected_input)
    assert features.dtype == torch.float32
    assert features.shape == (10, 4)
    assert not features.requires_grad
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


def test_extract_features__batch_size_invariant() -> None:
    torch.manual_seed(0)
    encoder = _Encoder()
    images = torch.randint(0, 256, (9, 2, 8, 8), dtype=torch.uint8)
    one = evaluation.extract_features(encoder, images, mean=0.5, std=0.5, batch_size=1)
    all_at_once = evaluation.extract_features(encoder, images, mean=0.5, std=0.5, batch_size=100)
    torch.testing.assert_close(one, all_at_once, rtol=1e-5, atol=1e-5)


def test_extract_features__rejects_float_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        evaluation.extract_features(_Encoder(), torch.zeros(2, 2, 8, 8), mean=0.5, std=0.5)
