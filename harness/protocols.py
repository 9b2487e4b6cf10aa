"""The evaluation protocols of the field on a trained encoder: fine-tuning, class-balanced label
fractions, n-shot k-NN, transfer to another dataset with the input adapted, and a 2-D embedding of
the test features (t-SNE) for the report.

Imports torch, ``harness.data`` and ``harness.evaluation`` only (never the methods or the database):
the caller hands in an encoder (``nn.Module``: float images ``(B, C, H, W)`` -> features ``(B, F)``)
and the trial's stored configuration. Accuracies are fractions in [0, 1]. Draws (label fractions,
few-shot sets) come from generators seeded by a hash of the protocol's name and its ``label_seed``,
never from the global RNG and never from the stream that picks a trial's training subset, so the
labeled images do not depend on the pre-training subset, the trial's seed or the order of work.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness import evaluation
from harness.data import ImageDataset, augment, balanced_subset_indices, load_dataset, normalize
from harness.data.augment import ViewRecipe
from harness.protocol_spec import HEAD_INITS, Task, head_init_of

__all__ = [
    "SUBSET_SEED",
    "FineTuneResult",
    "TaskResult",
    "adapt_images",
    "few_shot_indices",
    "few_shot_knn",
    "fine_tune",
    "label_fraction_indices",
    "run_task",
    "tsne_embedding",
]

# The seed of a trial's training/test subsets (``train.SUBSET_SEED``, which imports the methods
# and so cannot be imported here; a test keeps the two equal): evaluations use the trial's test set.
SUBSET_SEED = 0
# Luma weights (ITU-R 601-2, as torchvision's rgb_to_grayscale) for an RGB target on a gray encoder.
_LUMA = (0.2989, 0.587, 0.114)
# Fine-tuning augmentation: random resized crop of 60-100% of the area (aspect 3/4-4/3) and a
# horizontal flip, the "crop and flip" of SimCLR's fine-tuning (appendix B.5), milder crops for
# 28-pixel images.
FINE_TUNE_VIEW = ViewRecipe(scale=(0.6, 1.0), log_ratio=(math.log(3 / 4), math.log(4 / 3)), flip_p=0.5)
FINE_TUNE_MOMENTUM = 0.9
# LP-FT's probe ignores features whose spread on the labeled images is under this fraction of the
# median spread (evaluation.linear_head): on the 2-epoch SimCLR encoder of quickstart-evaluate, 75
# of 256 features; folded into the head they got weights up to 9e3 and fine-tuning from that head
# at 1% labels (lr 0.05) fell to 28.7% top-1, against 65.9% with them ignored (docs/REPORTS.md).
PROBE_RELATIVE_STD_FLOOR = 0.1
FEATURE_BATCH = 1024


def _generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded by the SHA-256 of ``parts``: independent streams per purpose."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def label_fraction_indices(labels: Tensor, fraction: float, *, seed: int) -> Tensor:
    """Sorted indices of a class-balanced ``fraction`` of the labeled images ``labels`` ``(N,)``.

    Every class gets ``max(1, round(fraction * N / K))`` images (``K`` classes present), or all it
    has when it has fewer. Drawn from a generator seeded by ``("label-fraction", seed)`` alone, so
    the draw does not depend on any training subset; for one seed the fractions are nested (1% is
    inside 10%), as each class's order is drawn before its count is taken. ``fraction`` 1 is every
    labeled image (100% of the labels, as imbalanced as the split is).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = labels.cpu()
    if fraction == 1.0:
        return torch.arange(labels.numel())
    classes = torch.unique(labels)
    per_class = max(1, round(fraction * labels.numel() / len(classes)))
    generator = _generator("label-fraction", int(seed))
    chosen = []
    for c in classes.tolist():
        members = torch.nonzero(labels == c, as_tuple=True)[0]
        order = members[torch.randperm(members.numel(), generator=generator)]
        chosen.append(order[:per_class])
    return torch.sort(torch.cat(chosen)).values


def few_shot_indices(labels: Tensor, shots: int, *, seed: int, draw: int) -> Tensor:
    """Sorted indices of ``shots`` images per class, draw number ``draw`` of seed ``seed``."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    labels = labels.cpu()
    generator = _generator("few-shot", int(seed), int(draw))
    chosen = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c, as_tuple=True)[0]
        if members.numel() < shots:
            raise ValueError(f"class {c} has {members.numel()} labeled images, fewer than {shots} shots")
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:shots]])
    return torch.sort(torch.cat(chosen)).values


def few_shot_knn(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    shots: int,
    draws: int,
    seed: int,
    num_classes: int,
    k: int | None = None,
    t: float = 0.1,
) -> list[float]:
    """k-NN top-1 on the test features with ``shots`` labeled images per class as the only
    neighbours, once per draw (``draws`` independent draws of seed ``seed``). ``k`` None: every
    drawn image votes (``shots * K``), weighted by ``exp(cos / t)``."""
    accuracies = []
    for draw in range(draws):
        index = few_shot_indices(train_labels, shots, seed=seed, draw=draw).to(train_features.device)
        support = train_features.index_select(0, index)
        support_labels = train_labels.to(train_features.device).index_select(0, index)
        neighbours = support.shape[0] if k is None else min(k, support.shape[0])
        accuracies.append(
            evaluation.knn_top1(
                support, support_labels, test_features, test_labels, k=neighbours, t=t, num_classes=num_classes
            )
        )
    return accuracies


def adapt_images(images: Tensor, *, channels: int, size: int) -> tuple[Tensor, str]:
    """uint8 ``(N, C, H, W)`` images made to fit an encoder of ``channels`` input channels and
    ``size x size`` inputs, and what was done ('none' when nothing): bilinear, antialiased resizing;
    gray -> RGB by repeating the channel, RGB -> gray by ITU-R 601 luma."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    steps = []
    have = images.shape[1]
    if have != channels:
        if have == 1:
            images = images.expand(-1, channels, -1, -1).contiguous()
            steps.append(f"channels {have} -> {channels} (gray repeated)")
        elif have == 3 and channels == 1:
            weights = torch.tensor(_LUMA, device=images.device).view(1, 3, 1, 1)
            images = (images.float() * weights).sum(dim=1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
            steps.append("channels 3 -> 1 (ITU-R 601 luma)")
        else:
            raise ValueError(f"cannot adapt {have}-channel images to a {channels}-channel encoder")
    height, width = images.shape[-2:]
    if (height, width) != (size, size):
        resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        images = resized.round().clamp(0, 255).to(torch.uint8)
        steps.append(f"resize {height}x{width} -> {size}x{size} (bilinear, antialiased)")
    return images, "; ".join(steps) if steps else "none"


@dataclass
class FineTuneResult:
    top1: float
    top5: float
    encoder: nn.Module  # the fine-tuned copy (the encoder passed in is left as it was)
    head: nn.Linear
    steps: int
    initial_head: nn.Linear  # a copy of the head before the first step (zero, or the probe's fit)


def fine_tune(
    encoder: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    epochs: int,
    lr: float,
    backbone_lr_scale: float,
    batch_size: int = 256,
    augment_views: bool = True,
    head_init: str = "zero",
    probe_epochs: int = 50,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> FineTuneResult:
    """Fine-tune a copy of ``encoder`` with a linear head on uint8 ``train_images`` and report
    (top-1, top-5) on ``test_images``.

    SGD with Nesterov momentum 0.9, no weight decay, cosine decay to 0 over ``epochs``; the head
    at ``lr * batch / 256``, the encoder's layers at ``backbone_lr_scale`` times that. The head
    starts (``head_init``) at zero ("zero": deterministic; the encoder receives gradients from the
    second step on) or at the linear probe's fit ("probe", LP-FT: ``evaluation.linear_head`` on
    the frozen encoder's unaugmented features of ``train_images``, ``probe_epochs`` epochs, seed
    ``seed``). Batch norm layers train (batch statistics). Shuffling and augmentation draw from
    generators seeded by ``seed``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
    if device is None:
        first = next(encoder.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    model = copy.deepcopy(encoder).to(device)
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    if head_init == "probe":
        features = evaluation.extract_features(
            model, train_images, mean=mean, std=std, batch_size=FEATURE_BATCH, device=device
        )
        head = evaluation.linear_head(
            features, train_labels, num_classes=num_classes, epochs=probe_epochs, seed=seed,
            relative_std_floor=PROBE_RELATIVE_STD_FLOOR,
        )
    else:
        with torch.no_grad():
            model.eval()
            feature_dim = model(normalize(train_images[:1], mean, std)).shape[1]
        head = nn.Linear(feature_dim, num_classes, device=device)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    initial_head = copy.deepcopy(head)
    n = train_images.shape[0]
    batch = min(batch_size, n)
    head_lr = lr * batch / 256
    groups = [{"params": list(head.parameters()), "lr": head_lr, "scale": 1.0}]
    backbone_params = [p for p in model.parameters() if p.requires_grad]
    if backbone_lr_scale > 0 and backbone_params:
        groups.append({"params": backbone_params, "lr": head_lr * backbone_lr_scale, "scale": backbone_lr_scale})
    else:  # scale 0: the encoder stays as it is (a probe trained through augmented views)
        for p in backbone_params:
            p.requires_grad_(False)
    optimizer = torch.optim.SGD(groups, lr=head_lr, momentum=FINE_TUNE_MOMENTUM, nesterov=True, weight_decay=0.0)
    steps_per_epoch = math.ceil(n / batch)
    total = epochs * steps_per_epoch
    order_generator = torch.Generator().manual_seed(int(seed))
    view_generator = torch.Generator(device=device).manual_seed(int(seed) + 1)
    step = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=order_generator).to(device)
        for start in range(0, n, batch):
            index = order[start : start + batch]
            images = train_images.index_select(0, index)
            if augment_views:
                x = augment(images, [FINE_TUNE_VIEW], generator=view_generator, mean=mean, std=std)[0]
            else:
                x = normalize(images, mean, std)
            factor = 0.5 * (1.0 + math.cos(math.pi * step / total))
            for group in optimizer.param_groups:
                group["lr"] = head_lr * group["scale"] * factor
            loss = F.cross_entropy(head(model(x)), train_labels.index_select(0, index))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    model.eval()
    features = evaluation.extract_features(model, test_images, mean=mean, std=std, batch_size=FEATURE_BATCH, device=device)
    with torch.no_grad():
        logits = head(features)
    top = logits.topk(min(5, num_classes), dim=1).indices
    hits = top == test_labels.to(device)[:, None]
    return FineTuneResult(
        hits[:, 0].float().mean().item(), hits.any(dim=1).float().mean().item(), model, head, step, initial_head
    )


def tsne_embedding(features: Tensor, labels: Tensor, *, perplexity: float = 30.0, seed: int = 0) -> dict[str, Any]:
    """2-D t-SNE (scikit-learn, PCA start, fixed ``seed``) of ``features`` ``(N, F)``: a JSON-able
    dict with ``x``, ``y`` (rounded to 4 decimals), ``label`` and the settings used."""
    from sklearn.manifold import TSNE

    points = features.float().cpu().numpy()
    n = points.shape[0]
    if n < 5:
        raise ValueError(f"t-SNE needs at least 5 points, got {n}")
    # scikit-learn requires perplexity < n; 3 * perplexity + 1 <= n keeps its neighbourhoods real.
    used = float(min(perplexity, max(1.0, (n - 1) / 3)))
    coordinates = TSNE(n_components=2, perplexity=used, init="pca", random_state=seed).fit_transform(points)
    return {
        "method": "tsne",
        "perplexity": used,
        "seed": seed,
        "x": [round(float(v), 4) for v in coordinates[:, 0]],
        "y": [round(float(v), 4) for v in coordinates[:, 1]],
        "label": [int(v) for v in labels.cpu().tolist()],
    }


# ---------------------------------------------------------------------------------------------
# One task of an evaluation plan on one trial's encoder


@dataclass
class TaskResult:
    """What one :class:`~harness.protocol_spec.Task` measured, with the values it resolved to
    (epochs, lr, sizes) and anything a report needs in ``details``."""

    top1: float | None
    top5: float | None = None
    spread: float | None = None  # sample std over draws (few-shot)
    epochs: int | None = None
    lr: float | None = None
    n_train: int | None = None
    n_test: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _features(encoder: nn.Module, dataset: ImageDataset, images: Tensor, device: torch.device) -> Tensor:
    return evaluation.extract_features(
        encoder, images, mean=dataset.mean, std=dataset.std, batch_size=FEATURE_BATCH, device=device
    )


def run_task(
    task: Task,
    encoder: nn.Module,
    config: Mapping[str, Any],
    *,
    device: torch.device | str = "cpu",
    from_scratch: bool = False,
) -> TaskResult:
    """Run ``task`` on ``encoder``, the trained encoder of a trial whose stored configuration is
    ``config`` (dataset, data_root, test_size, knn_k, knn_t, linear_epochs, seed). ``from_scratch``:
    the encoder is untrained (random_init), so fine-tuning trains all of it at the full rate.

    The test images are the trial's own test subset (or the transfer target's test split); the
    labeled pool is the whole training split of that dataset (its ``train_size`` for a transfer),
    whatever subset the trial pre-trained on."""
    device = torch.device(device)
    start = time.perf_counter()
    encoder = encoder.to(device).eval()
    source_name = str(config["dataset"])
    root = config.get("data_root")
    seed = int(config.get("seed", 0))
    knn_t = float(config.get("knn_t", 0.1))
    source_train = load_dataset(source_name, "train", root=root, device="cpu")
    details: dict[str, Any] = {}
    if task.dataset is None:
        pool = source_train
        test = load_dataset(source_name, "test", root=root, size=config.get("test_size"), seed=SUBSET_SEED, device="cpu")
    else:
        pool = load_dataset(task.dataset, "train", root=root, size=task.setting("train_size"), seed=SUBSET_SEED, device="cpu")
        test = load_dataset(task.dataset, "test", root=root, size=task.setting("test_size"), seed=SUBSET_SEED, device="cpu")
        channels, size = source_train.channels, source_train.image_size
        pool_images, adaptation = adapt_images(pool.images, channels=channels, size=size)
        test_images, _ = adapt_images(test.images, channels=channels, size=size)
        # The encoder's input convention: the source dataset's statistics.
        pool = ImageDataset(pool_images, pool.labels, pool.num_classes, pool.name, "train", source_train.mean, source_train.std)
        test = ImageDataset(test_images, test.labels, test.num_classes, test.name, "test", source_train.mean, source_train.std)
        details["adaptation"] = adaptation + "; normalized with the statistics of " + source_name
    num_classes = pool.num_classes
    result = TaskResult(top1=None, n_test=len(test), details=details)

    if task.protocol == "knn":
        k = int(config.get("knn_k", 200))
        train_features = _features(encoder, pool, pool.images, device)
        test_features = _features(encoder, test, test.images, device)
        result.top1 = evaluation.knn_top1(
            train_features, pool.labels, test_features, test.labels, k=k, t=knn_t, num_classes=num_classes
        )
        result.n_train = len(pool)
        details.update(k=min(k, len(pool)), t=knn_t)
    elif task.protocol == "linear":
        index = label_fraction_indices(pool.labels, float(task.fraction or 1.0), seed=int(task.label_seed or 0))
        epochs = int(task.setting("epochs") or config.get("linear_epochs", 50))
        train_features = _features(encoder, pool, pool.images.index_select(0, index), device)
        test_features = _features(encoder, test, test.images, device)
        result.top1, result.top5 = evaluation.linear_probe(
            train_features,
            pool.labels.index_select(0, index),
            test_features,
            test.labels,
            num_classes=num_classes,
            epochs=epochs,
            seed=seed,
        )
        result.epochs, result.lr, result.n_train = epochs, 0.1, int(index.numel())
        details["optimizer"] = "adam, cosine decay, standardized features (evaluation.linear_probe)"
    elif task.protocol == "finetune":
        index = label_fraction_indices(pool.labels, float(task.fraction or 1.0), seed=int(task.label_seed or 0))
        scale = 1.0 if from_scratch else float(task.setting("backbone_lr_scale"))
        epochs, lr = int(task.setting("epochs")), float(task.setting("lr"))
        # Training from scratch starts its head at zero: a probe's fit on random features, folded
        # onto their small scale, sent the from-scratch runs to chance (docs/REPORTS.md).
        head_init = "zero" if from_scratch else head_init_of(dict(task.settings))
        probe_epochs = int(config.get("linear_epochs", 50))
        tuned = fine_tune(
            encoder,
            pool.images.index_select(0, index),
            pool.labels.index_select(0, index),
            test.images,
            test.labels,
            num_classes=num_classes,
            mean=pool.mean,
            std=pool.std,
            epochs=epochs,
            lr=lr,
            backbone_lr_scale=scale,
            batch_size=int(task.setting("batch_size")),
            augment_views=bool(task.setting("augment")),
            head_init=head_init,
            probe_epochs=probe_epochs,
            seed=seed,
            device=device,
        )
        result.top1, result.top5 = tuned.top1, tuned.top5
        result.epochs, result.lr, result.n_train = epochs, lr, int(index.numel())
        details.update(
            backbone_lr_scale_used=scale,
            from_scratch=from_scratch,
            steps=tuned.steps,
            head_init_used=head_init,
            **({"probe_epochs": probe_epochs} if head_init == "probe" else {}),
            optimizer="sgd nesterov momentum 0.9, no weight decay, cosine decay; lr per 256 images",
        )
    elif task.protocol == "few_shot_knn":
        shots, draws = int(task.shots or 1), int(task.setting("draws"))
        label_seed = int(task.label_seed or 0)
        needed = torch.unique(
            torch.cat([few_shot_indices(pool.labels, shots, seed=label_seed, draw=d) for d in range(draws)])
        )
        # Features of the drawn images only (a few hundred instead of the whole split), placed at
        # their rows of the pool; the other rows are never drawn.
        drawn = _features(encoder, pool, pool.images.index_select(0, needed), device)
        train_features = torch.zeros(len(pool), drawn.shape[1], device=drawn.device)
        train_features[needed.to(drawn.device)] = drawn
        test_features = _features(encoder, test, test.images, device)
        t = float(task.setting("t") or knn_t)
        k = task.setting("k")
        accuracies = few_shot_knn(
            train_features, pool.labels, test_features, test.labels,
            shots=shots, draws=draws, seed=label_seed, num_classes=num_classes, k=k, t=t,
        )
        result.top1 = float(sum(accuracies) / len(accuracies))
        result.spread = float(torch.tensor(accuracies, dtype=torch.float64).std().item()) if draws > 1 else None
        result.n_train = shots * num_classes
        details.update(per_draw=accuracies, k=shots * num_classes if k is None else min(int(k), shots * num_classes), t=t)
    elif task.protocol == "embedding":
        points = min(int(task.setting("points")), len(test))
        index = balanced_subset_indices(test.labels, points, seed=SUBSET_SEED, name=test.name) if points < len(test) else torch.arange(len(test))
        features = _features(encoder, test, test.images.index_select(0, index), device)
        details.update(
            tsne_embedding(features, test.labels.index_select(0, index), perplexity=float(task.setting("perplexity")), seed=0)
        )
        details["class_names"] = list(test.class_names)
        result.n_test = int(index.numel())
    else:
        raise ValueError(f"unknown evaluation protocol {task.protocol!r}")
    result.seconds = time.perf_counter() - start
    return result
