"""Throughput of two-view generation: ours vs the seed notebook's PIL + DataLoader pipeline.

Used by ``tests/benchmarks/test_bench_pipeline.py`` and by ``harness bench pipeline``. The seed
pipeline is the notebook's torchvision transform applied twice per image inside a
``DataLoader(num_workers=2, batch_size=256)``; ours is :func:`harness.data.two_views` on batches
gathered from the uint8 tensor, as the training loop does. Both produce normalized float batches of
two views, so the comparison is like for like.
"""

from __future__ import annotations

import dataclasses
import importlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.data.augment import two_views
from harness.data.datasets import load_dataset

__all__ = [
    "SeedTwoViewDataset",
    "TwoViews",
    "benchmark_images",
    "compare_pipelines",
    "folder_epoch",
    "make_imagefolder_loader",
    "make_seed_loader",
    "ours_epoch",
    "ours_images_per_s",
    "profile_augment_stages",
    "seed_epoch",
    "seed_pipeline_images_per_s",
    "seed_transform",
    "shard_epoch",
    "shard_pipeline_rates",
    "write_benchmark_folder",
]


def seed_transform(
    mean: float = 0.5, std: float = 0.5, *, size: int = 28, channels: int = 1
) -> Callable[[Any], torch.Tensor]:
    """The seed notebook's per-image PIL transform (one view), at ``size`` px (28 in the notebook)
    for ``channels``-channel images."""
    import torchvision.transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.8, 1.0)),
            T.RandomApply([T.GaussianBlur(3)], p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.ToTensor(),
            T.Normalize((mean,) * channels, (std,) * channels),
        ]
    )


class SeedTwoViewDataset(torch.utils.data.Dataset):
    """Grayscale images ``(N, H, W)`` uint8 as PIL images, each transformed twice (the seed's way)."""

    def __init__(self, images: np.ndarray, mean: float = 0.5, std: float = 0.5) -> None:
        self.images = images
        self.transform = seed_transform(mean, std)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        image = Image.fromarray(self.images[index])
        return self.transform(image), self.transform(image)


def benchmark_images(n_images: int = 4096, *, name: str = "fashion-mnist", seed: int = 0) -> torch.Tensor:
    """``n_images`` class-balanced training images uint8 ``(n, 1, 28, 28)`` on the CPU."""
    return load_dataset(name, "train", size=n_images, seed=seed).images


def make_seed_loader(
    images: torch.Tensor, *, batch_size: int = 256, num_workers: int = 2
) -> torch.utils.data.DataLoader:
    """The seed pipeline's loader over uint8 ``(N, 1, H, W)`` images; persistent workers so that
    repeated epochs measure the steady state, not process start-up."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be uint8 (N, 1, H, W), got {images.dtype} {tuple(images.shape)}")
    dataset = SeedTwoViewDataset(images[:, 0].cpu().numpy())
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def seed_epoch(loader: torch.utils.data.DataLoader) -> int:
    """One pass over the seed loader; the number of images seen."""
    seen = 0
    for view1, _view2 in loader:
        seen += int(view1.shape[0])
    return seen


def ours_epoch(
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    strength: float = 1.0,
    generator: torch.Generator | None = None,
    order_generator: torch.Generator | None = None,
) -> int:
    """One shuffled pass of :func:`two_views` over uint8 ``images`` (batches gathered by index, as
    the training loop does); the number of images seen. ``generator`` draws the augmentations (on
    the images' device), ``order_generator`` the shuffle (on the CPU)."""
    order = torch.randperm(images.shape[0], generator=order_generator).to(images.device)
    seen = 0
    for start in range(0, images.shape[0], batch_size):
        batch = images.index_select(0, order[start : start + batch_size])
        view1, _view2 = two_views(batch, strength, generator=generator)
        seen += int(view1.shape[0])
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    return seen


def _best_rate(run: Callable[[], int], repeats: int) -> float:
    """Images per second of the fastest of ``repeats`` runs (after one warm-up run)."""
    run()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        seen = run()
        best = max(best, seen / (time.perf_counter() - start))
    return best


def seed_pipeline_images_per_s(
    images: torch.Tensor, *, batch_size: int = 256, num_workers: int = 2, repeats: int = 2
) -> float:
    """Steady-state images/s (two views each) of the seed pipeline over ``images``."""
    loader = make_seed_loader(images, batch_size=batch_size, num_workers=num_workers)
    # The persistent workers stop when the loader is garbage-collected on return.
    return _best_rate(lambda: seed_epoch(loader), repeats)


def ours_images_per_s(
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    strength: float = 1.0,
    device: str | torch.device = "cpu",
    repeats: int = 3,
    seed: int = 0,
) -> float:
    """Images/s (two views each) of :func:`two_views` over ``images`` moved to ``device``."""
    on_device = images.to(device)
    generator = torch.Generator(device=on_device.device).manual_seed(seed)
    order_generator = torch.Generator().manual_seed(seed)

    def run() -> int:
        return ours_epoch(
            on_device, batch_size=batch_size, strength=strength, generator=generator, order_generator=order_generator
        )

    return _best_rate(run, repeats)


def compare_pipelines(
    images: torch.Tensor | None = None,
    *,
    n_images: int = 4096,
    batch_size: int = 256,
    num_workers: int = 2,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Both pipelines on the same images in one run; for ``harness bench pipeline``.

    Returns ``{"seed_images_per_s", "ours_images_per_s", "ratio", "n_images", "batch_size",
    "num_workers", "device", "torch_threads"}`` where ``ratio = ours / seed``.
    """
    if images is None:
        images = benchmark_images(n_images)
    seed_rate = seed_pipeline_images_per_s(images, batch_size=batch_size, num_workers=num_workers)
    ours_rate = ours_images_per_s(images, batch_size=batch_size, device=device)
    return {
        "seed_images_per_s": seed_rate,
        "ours_images_per_s": ours_rate,
        "ratio": ours_rate / seed_rate,
        "n_images": int(images.shape[0]),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": str(torch.device(device)),
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------
# Image folders: torchvision's ImageFolder + DataLoader against a prepared shard


class TwoViews:
    """A per-image transform applied twice (the seed notebook's two-view dataset wrapper)."""

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.transform(image)


def write_benchmark_folder(
    root: str | Path, n_images: int, *, size: int = 80, num_classes: int = 8, quality: int = 90
) -> Path:
    """An ImageFolder tree of ``n_images`` RGB JPEGs (``size`` px, the generated ``synthetic``
    shapes) under ``root/train``; returns that folder."""
    from PIL import Image

    data = load_dataset(
        "synthetic", "train", channels=3, image_size=size, num_train=n_images, num_classes=num_classes
    )
    folder = Path(root) / "train"
    for index, (pixels, label) in enumerate(zip(data.images, data.labels.tolist())):
        target = folder / data.class_names[label]
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(target / f"{index:06d}.jpg", quality=quality)
    return folder


def make_imagefolder_loader(
    folder: str | Path, *, size: int, batch_size: int = 256, num_workers: int = 2
) -> torch.utils.data.DataLoader:
    """torchvision's ``ImageFolder`` with the seed notebook's transform twice per image (RGB, at
    ``size`` px), in a shuffled ``DataLoader``: the usual per-image pipeline over a folder.
    Persistent workers, so repeated epochs measure the steady state."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(folder), transform=TwoViews(seed_transform(size=size, channels=3)))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, persistent_workers=num_workers > 0
    )


def folder_epoch(loader: torch.utils.data.DataLoader) -> int:
    """One pass over an ImageFolder loader of (views, label) batches; the number of images seen."""
    seen = 0
    for (view1, _view2), _labels in loader:
        seen += int(view1.shape[0])
    return seen


def shard_epoch(
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    stream: bool = False,
    generator: torch.Generator | None = None,
    order_generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    compiled: bool | None = None,
) -> int:
    """One shuffled pass over uint8 ``images`` (a RAM tensor, or the memory map of a shard with
    ``stream=True``) as the training loop makes it: batches from :func:`iter_batches` (prefetched
    by a thread when streamed), two views each by :func:`two_views` (``compiled``: its
    torch.compile'd pixel stage, see :func:`harness.data.augment.augment`); the number of images
    seen."""
    from harness.data.stream import iter_batches

    device = torch.device(device)
    order = torch.randperm(images.shape[0], generator=order_generator)
    batches = [order[start : start + batch_size] for start in range(0, images.shape[0], batch_size)]
    if not stream:
        batches = [b.to(images.device) for b in batches]
    seen = 0
    for batch in iter_batches(images, batches, device, stream=stream):
        view1, _view2 = two_views(batch, 1.0, generator=generator, compiled=compiled)
        seen += int(view1.shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen


# ----------------------------------------------------------------------------------------------
# Where the augmentation's time goes


def profile_augment_stages(
    *, batch_size: int = 256, size: int = 64, channels: int = 3, repeats: int = 5, seed: int = 0
) -> dict[str, float]:
    """Median milliseconds per stage of :func:`two_views` (seed recipe, strength 1) on random uint8
    ``(batch_size, channels, size, size)`` images on the CPU, stages timed alternately round by
    round: the eager crop (``grid_sample``), the separable crop (row gathers + a column matrix
    product) eager and compiled, and compiled with the blur folded into it; each eager photometric
    operation on the whole batch (as a GPU runs them), the eager photometric chain with the CPU's
    row subsets, the compiled chain alone (blur included, as a separate pass); the compiled stage
    on the whole batch (the crop with the blur, then the rest of the chain channel by channel for
    RGB), and what ``compiled=True`` runs: the crop's bands once, then that stage in cache-sized
    pieces. The first calls' seconds, compile included,
    are under ``compile_first_call_s`` (the chain) and ``compile_stage_first_call_s`` (the whole
    stage). The photometric stages get a fresh copy of the cropped batch (they consume it): the
    copy's time is listed too."""
    aug = importlib.import_module("harness.data.augment")
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, channels, size, size), dtype=torch.uint8, generator=generator)
    recipes = aug.view_recipes("simclr", 1.0, channels=channels, image_size=size)
    captured: dict[str, Any] = {}
    pixels = aug._pixels

    def capture(plan: Any, imgs: torch.Tensor, draws: Any, *, subsets: bool = False) -> torch.Tensor:
        captured.update(plan=plan, draws=draws)
        return imgs

    aug._pixels = capture
    try:
        aug.augment(images, recipes, generator=generator, compiled=False)
    finally:
        aug._pixels = pixels
    plan, draws = captured["plan"], captured["draws"]
    cropped = aug._crop(plan, images, draws)
    off = {field: False for field in ("brightness", "contrast", "saturation", "hue", "grayscale", "solarize")}
    only = {
        f"blur (kernel {plan.blur_kernel})": dataclasses.replace(plan, **off),
        **{op: dataclasses.replace(plan, blur_kernel=0, **{**off, op: True}) for op in off if getattr(plan, op)},
    }

    def photometric(stage_plan: Any, subsets: bool) -> Callable[[], object]:
        return lambda: aug._photometric(stage_plan, cropped.clone(), draws, subsets=subsets)

    unblurred = dataclasses.replace(plan, blur_kernel=0)
    compiled = torch.compile(lambda x: aug._photometric(plan, x, draws))
    compiled_crop = torch.compile(lambda x: aug._crop_separable(unblurred, x, draws))
    compiled_crop_blur = torch.compile(lambda x: aug._crop_separable(plan, x, draws))
    def whole_stage(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(cropped)
        bands = aug._crop_bands(plan, draws.crop, draws.sigma, size, size)
        aug._stage_pixels(unblurred, x, aug._crop_weights(bands, size), draws, out)
        return out

    compiled_stage = torch.compile(whole_stage)
    first_call: dict[str, float] = {}
    for key, run in (("compile_first_call_s", lambda: compiled(cropped.clone())),
                     ("compile_stage_first_call_s", lambda: compiled_stage(images))):
        start = time.perf_counter()
        run()
        first_call[key] = time.perf_counter() - start
    compiled_crop(images)
    compiled_crop_blur(images)
    if aug._compiled_pixels(plan, images, draws) is None:  # it fell back: there is nothing to time
        raise RuntimeError(f"the compiled pixel stage failed: {aug.compiled_augmentation()[-1]['failure']}")
    stages: dict[str, Callable[[], object]] = {
        "crop (grid_sample)": lambda: aug._crop(plan, images, draws),
        "crop, separable, eager": lambda: aug._crop_separable(unblurred, images, draws),
        "crop, separable, compiled": lambda: compiled_crop(images),
        f"crop + blur (kernel {plan.blur_kernel}), separable, compiled": lambda: compiled_crop_blur(images),
        "copy of the cropped batch": lambda: cropped.clone(),
        **{f"eager {name}, every row": photometric(p, False) for name, p in only.items()},
        "eager chain, every row (GPU)": photometric(plan, False),
        "eager chain, CPU row subsets": photometric(plan, True),
        "compiled chain (blur as its own pass)": lambda: compiled(cropped.clone()),
        "compiled stage, whole batch": lambda: compiled_stage(images),
        "compiled stage in pieces (compiled=True)": lambda: aug._compiled_pixels(plan, images, draws),
    }
    seconds: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(repeats):
        for name, run in stages.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    result = {name: 1000 * statistics.median(values) for name, values in seconds.items()}
    result.update(first_call)
    return result


# ----------------------------------------------------------------------------------------------
# A prepared shard at a given resolution on a device (issue 14's GPU goal: 224 px, two views)


def shard_pipeline_rates(
    root: str | Path,
    *,
    image_size: int = 224,
    n_images: int = 2048,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    epochs: int = 3,
    compiled: bool = True,
    workers: int | None = None,
    report: Callable[[str], object] = lambda line: None,
) -> dict[str, Any]:
    """Images per second (two views, augmentation included) delivered from a prepared shard,
    resident on ``device``: the generated JPEG folder (``n_images`` at ``image_size * 8 / 7`` px,
    as ImageNet's 256 for 224) is written under ``root``, prepared at ``image_size`` and moved to
    the device whole, then :func:`shard_epoch` runs ``epochs`` timed epochs after one warm-up
    (which compiles, when ``compiled``), eager and compiled alternating. The median epoch's rate
    is returned with the device's name; ``report`` gets a line per epoch as it ends (so that a run
    cut by a time limit still shows what it measured)."""
    from harness.data.shards import open_shard, prepare_shard
    from harness.provenance import device_name

    device = torch.device(device)
    folder = write_benchmark_folder(root, n_images, size=image_size * 8 // 7)
    shard_dir = Path(root) / f"shard-{image_size}"
    prepare_shard(folder, shard_dir, resolution=image_size, workers=workers, progress=False)
    images, _, _ = open_shard(shard_dir, source=folder)
    on_device = torch.from_numpy(images).to(device)
    modes = {"eager": False, **({"compiled": True} if compiled else {})}
    generator = torch.Generator(device=device).manual_seed(0)
    order_generator = torch.Generator().manual_seed(0)

    def epoch(mode: bool) -> int:
        return shard_epoch(on_device, batch_size=batch_size, generator=generator, order_generator=order_generator,
                           device=device, compiled=mode)

    first: dict[str, float] = {}
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    for name, mode in modes.items():
        start = time.perf_counter()
        epoch(mode)
        first[name] = time.perf_counter() - start
        report(f"{name}: first epoch {first[name]:.2f} s")
    for round_ in range(epochs):
        for name, mode in modes.items():
            start = time.perf_counter()
            assert epoch(mode) == n_images
            seconds[name].append(time.perf_counter() - start)
            report(f"{name}: epoch {round_ + 1} {n_images / seconds[name][-1]:,.0f} img/s")
    figures: dict[str, Any] = {
        "device": device_name(str(device)),
        "image_size": image_size,
        "n_images": n_images,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
    }
    for name in modes:
        figures[f"{name}_images_per_s"] = round(n_images / statistics.median(seconds[name]), 1)
        figures[f"{name}_first_epoch_s"] = round(first[name], 2)
    return figures
