"""Evaluation of a frozen encoder: features extracted once, then k-NN, a linear probe on the cached
features, alignment/uniformity of projections, effective rank and the collapse indicator.

Everything runs on the features' device; nothing here trains the encoder. Accuracies are fractions
in [0, 1]. Imports torch, and ``harness.losses`` (torch only) for alignment and uniformity.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.data.stream import iter_batches
from harness.losses import alignment, uniformity

__all__ = [
    "alignment_uniformity",
    "effective_rank",
    "extract_features",
    "feature_std",
    "knn_predict",
    "knn_top1",
    "linear_head",
    "linear_probe",
]

# RankMe's epsilon (Garrido et al. 2023, eq. 1).
RANKME_EPS = 1e-7
# Floor of the per-feature standard deviation when the probe standardizes features, so that a
# constant (collapsed) feature maps to 0 instead of dividing by zero.
STD_FLOOR = 1e-6


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images_uint8: Tensor,
    *,
    mean: float | Sequence[float] | Tensor,
    std: float | Sequence[float] | Tensor,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> Tensor:
    """Features ``(N, F)`` float32 of uint8 images ``(N, C, H, W)``, on ``device``.

    The identity view: ``(x / 255 - mean) / std`` per channel, no augmentation. The encoder runs in
    eval mode (BN running statistics) without gradients, under bf16 autocast on CUDA; its previous
    training mode is restored. ``device`` defaults to the encoder's.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        chunks = [out.float() for out in _identity_view_outputs(encoder, images_uint8, mean, std, batch_size, device)]
    finally:
        encoder.train(was_training)
    if not chunks:
        raise ValueError("no images to extract features from")
    return torch.cat(chunks)


@torch.no_grad()
def recompute_batch_norm(
    encoder: nn.Module,
    images_uint8: Tensor,
    *,
    mean: float | Sequence[float] | Tensor,
    std: float | Sequence[float] | Tensor,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> int:
    """Replace the running statistics of every batch norm in ``encoder`` by the average of the
    batches' statistics over the identity views of ``images_uint8`` ``(N, C, H, W)``, in one pass
    in training mode without gradients (momentum ``None``: each batch's mean and unbiased variance
    weighted equally, ``torch.optim.swa_utils.update_bn``'s definition; with a last batch smaller
    than ``batch_size`` it weighs as much as the others, and the variance is the mean of the
    batches' variances). Weights are not touched. Returns the number of batch norms updated (0 for
    an encoder without any, e.g. a ViT: nothing changes); their momentum and the encoder's mode
    are restored."""
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = encoder.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    encoder.train()
    try:
        for _ in _identity_view_outputs(encoder, images_uint8, mean, std, batch_size, device):
            pass
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        encoder.train(was_training)
    return len(norms)


def _identity_view_outputs(
    encoder: nn.Module,
    images_uint8: Tensor,
    mean: float | Sequence[float] | Tensor,
    std: float | Sequence[float] | Tensor,
    batch_size: int,
    device: torch.device | str | None,
) -> Iterator[Tensor]:
    """``encoder`` applied to the identity views ``(x / 255 - mean) / std`` of ``images_uint8``, batch
    by batch, in the encoder's current mode (bf16 autocast on CUDA)."""
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
        raise ValueError(
            f"images must be uint8 (N, C, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}"
        )
    if device is None:
        first = next(encoder.parameters(), None)
        device = first.device if first is not None else images_uint8.device
    device = torch.device(device)
    channels = images_uint8.shape[1]
    scale = _channel_tensor(std, channels, device) * 255.0
    shift = _channel_tensor(mean, channels, device) * 255.0
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    # Images on another device (host memory, a memory-mapped shard) are streamed: the next
    # chunks are gathered and copied while this one runs.
    slices = [slice(start, start + batch_size) for start in range(0, images_uint8.shape[0], batch_size)]
    for batch in iter_batches(images_uint8, slices, device):
        # (x / 255 - mean) / std == (x - 255 mean) / (255 std): one subtraction, one division.
        x = (batch.float() - shift) / scale
        with autocast:
            yield encoder(x)


def _channel_tensor(value: float | Sequence[float] | Tensor, channels: int, device: torch.device) -> Tensor:
    """A per-channel statistic as a ``(1, C, 1, 1)`` float32 tensor."""
    tensor = torch.as_tensor(value, dtype=torch.float32, device=device).flatten()
    if tensor.numel() == 1:
        tensor = tensor.expand(channels)
    if tensor.numel() != channels:
        raise ValueError(f"expected 1 or {channels} per-channel values, got {tensor.numel()}")
    return tensor.view(1, channels, 1, 1)


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    k: int = 200,
    t: float = 0.1,
    num_classes: int,
    chunk_size: int = 1024,
) -> Tensor:
    """Predicted classes ``(M,)`` of the weighted k-nearest-neighbour classifier of Wu et al. 2018
    (InstDisc), as used by Caron et al. 2021 (DINO): cosine similarity, the ``k`` most similar
    training samples each vote for their class with weight ``exp(sim / t)``.

    ``train_features`` ``(N, F)``, ``test_features`` ``(M, F)``, ``train_labels`` int64 ``(N,)``. The
    similarity matrix is computed ``chunk_size`` test rows at a time (memory ``chunk_size x N``),
    top-k on the training features' device. ``k`` is clipped to ``N``. Ties in the vote go to the
    smallest class index.
    """
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one training and one test sample")
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float().to(device), dim=1)
    train_labels = train_labels.to(device)
    k = min(k, train.shape[0])
    predictions = []
    for start in range(0, test.shape[0], chunk_size):
        similarity = test[start : start + chunk_size] @ train.t()  # (chunk, N)
        top_similarity, top_index = similarity.topk(k, dim=1)  # (chunk, k)
        votes = torch.zeros(similarity.shape[0], num_classes, device=device)
        # exp((s - s_max) / t): the same votes up to a per-row factor, without float32 overflow
        # once s / t > 88 (t = 0.01 and any neighbour closer than cosine 0.89).
        weights = ((top_similarity - top_similarity[:, :1]) / t).exp()
        votes.scatter_add_(1, train_labels[top_index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_top1(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 200,
    t: float = 0.1,
    num_classes: int,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy of :func:`knn_predict` on ``test_labels`` ``(M,)``."""
    predictions = knn_predict(
        train_features, train_labels, test_features, k=k, t=t, num_classes=num_classes, chunk_size=chunk_size
    )
    return (predictions == test_labels.to(predictions.device)).float().mean().item()


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    epochs: int = 50,
    batch_size: int = 256,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> tuple[float, float]:
    """(top-1, top-5) test accuracy of a linear classifier trained on cached features.

    Features are standardized with the training set's per-feature mean and standard deviation
    (so the probe's learning rate does not depend on the encoder's feature scale). The classifier
    starts at zero and is trained with Adam (``lr``, ``weight_decay``) under a cosine learning-rate
    decay to zero, on mini-batches of ``batch_size`` in a shuffled order drawn from ``seed`` on the
    CPU: the same seed gives the same result, on any device up to floating-point reduction order.
    The default ``lr`` 0.1 was the best of 3e-3, 1e-2, 3e-2 and 0.1 on standardized Fashion-MNIST
    features at 10 and 50 epochs, and the only one of them that fits separable data in 30 epochs.
    Runs on the features' device (works inside ``torch.no_grad()`` too). Top-5 means
    top-min(5, num_classes).
    """
    classifier, mean, std = _fit_probe(
        train_features, train_labels, num_classes, epochs, batch_size, lr, weight_decay, seed
    )
    device = train_features.device
    test_x = (test_features.float().to(device) - mean) / std
    test_y = test_labels.to(device)
    with _one_cpu_thread(device), torch.no_grad():
        logits = classifier(test_x)
    top = logits.topk(min(5, num_classes), dim=1).indices  # (M, min(5, C))
    hits = top == test_y[:, None]
    return hits[:, 0].float().mean().item(), hits.any(dim=1).float().mean().item()


def linear_head(
    train_features: Tensor,
    train_labels: Tensor,
    *,
    num_classes: int,
    epochs: int = 50,
    batch_size: int = 256,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
    relative_std_floor: float = 0.0,
) -> nn.Linear:
    """The classifier :func:`linear_probe` fits (same arguments, same steps), as a layer on the raw
    features: the standardization is folded into it (``W / std``, ``b - (W / std) mean``), so
    ``head(f)`` equals the probe's logits on ``(f - mean) / std``. Fine-tuning starts from it
    (LP-FT, Kumar et al. 2022). Returned without gradients attached, on the features' device.

    ``relative_std_floor`` > 0 treats the features whose standard deviation is below that fraction
    of the median one as collapsed (standardized to 0, so their weights stay 0), as the probe does
    for constant ones: folded, a nearly constant feature would get a weight of ``w / std`` (1e4 on
    a 2-epoch SimCLR encoder), and any change of it while fine-tuning would swamp the logits."""
    classifier, mean, std = _fit_probe(
        train_features, train_labels, num_classes, epochs, batch_size, lr, weight_decay, seed, relative_std_floor
    )
    head = nn.Linear(classifier.in_features, num_classes, device=train_features.device)
    with torch.no_grad():
        weight = classifier.weight / std
        head.weight.copy_(weight)
        head.bias.copy_(classifier.bias - weight @ mean)
    return head


def _fit_probe(
    train_features: Tensor,
    train_labels: Tensor,
    num_classes: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    relative_std_floor: float = 0.0,
) -> tuple[nn.Linear, Tensor, Tensor]:
    """The probe's classifier on standardized features and the (mean, std) it standardized with
    (``std`` infinite for a feature under ``relative_std_floor`` times the median std: it maps to 0)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = train_features.device
    train_x = train_features.float()
    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0).clamp_min(STD_FLOOR)
    if relative_std_floor > 0:
        std = torch.where(std < relative_std_floor * std.median(), torch.full_like(std, math.inf), std)
    train_x = (train_x - mean) / std
    train_y = train_labels.to(device)
    with _one_cpu_thread(device), torch.enable_grad():
        classifier = _train_probe(train_x, train_y, num_classes, epochs, batch_size, lr, weight_decay, seed)
    return classifier, mean, std


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread for the probe on the CPU: its products (batch x F x C) are too small to
    split, and thread hand-offs dominate (0.4 s on one thread against 13-33 s on two, for 300 steps
    on a loaded 2-core machine). The previous setting is restored."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train_probe(
    train_x: Tensor,
    train_y: Tensor,
    num_classes: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> nn.Linear:
    """A linear classifier ``(F -> C)`` fitted to standardized features ``(N, F)``, zero start."""
    device = train_x.device
    classifier = nn.Linear(train_x.shape[1], num_classes, device=device)
    # Zero start: deterministic without touching the global RNG (the problem is convex).
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.Adam(
        classifier.parameters(), lr=lr, weight_decay=weight_decay, fused=device.type == "cuda"
    )
    n = train_x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            loss = F.cross_entropy(classifier(train_x[index]), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return classifier


@torch.no_grad()
def alignment_uniformity(z1: Tensor, z2: Tensor) -> tuple[float, float]:
    """Wang & Isola 2020: alignment (mean squared distance of the two views' normalized
    projections, ``(N, D)`` each; lower is better) and uniformity (log mean Gaussian potential,
    averaged over the two views; lower is better)."""
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    align = alignment(z1, z2)
    uniform = (uniformity(z1) + uniformity(z2)) / 2
    return align.item(), uniform.item()


@torch.no_grad()
def effective_rank(features: Tensor) -> float:
    """RankMe (Garrido et al. 2023, eq. 1): ``exp(-sum p_k log p_k)`` with
    ``p_k = sigma_k / ||sigma||_1 + eps`` over the singular values of ``features`` ``(N, F)``.
    Between 1 and min(N, F): ``d`` for ``d`` orthonormal columns, about 1 for rank one; 0 for
    all-zero features."""
    singular_values = torch.linalg.svdvals(features.float())
    total = singular_values.sum()
    if total.item() == 0.0:
        return 0.0  # all-zero features span no dimension
    p = singular_values / total + RANKME_EPS
    return torch.exp(-(p * p.log()).sum()).item()


@torch.no_grad()
def feature_std(features: Tensor) -> float:
    """Mean over dimensions of the per-dimension standard deviation of the L2-normalized features
    ``(N, F)`` (Chen & He 2021, sec. 4.1): 0 for collapsed features, about ``1 / sqrt(F)`` for
    features spread over the sphere."""
    return F.normalize(features.float(), dim=1).std(dim=0).mean().item()
