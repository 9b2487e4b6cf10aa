"""The seed notebook's SimCLR training loop, kept as the reference that the harness's training
throughput is measured against (same CPU or GPU, same run).

Per-image PIL augmentation in a 2-worker DataLoader (``harness.data.pipeline_bench``), the batch
copied to the device each step, the encoder plus a 2-layer projector, and the reference NT-Xent.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from harness.backbones import BACKBONES
from harness.data.pipeline_bench import make_seed_loader
from harness.losses import nt_xent

SEED_LR = 1e-3
SEED_TEMPERATURE = 0.5
WARMUP_STEPS = 3


def seed_model(backbone: str = "small_cnn", in_channels: int = 1, image_size: int = 28) -> nn.Module:
    encoder, features = BACKBONES[backbone](in_channels, image_size, fused_stem=False)
    return nn.Sequential(encoder, nn.Linear(features, 512), nn.ReLU(inplace=True), nn.Linear(512, 128))


def seed_loop_images_per_s(
    images: torch.Tensor,
    *,
    backbone: str = "small_cnn",
    batch_size: int = 256,
    steps: int = 10,
    device: str | torch.device = "cpu",
    num_workers: int = 2,
) -> dict[str, float]:
    """Train the seed way for ``WARMUP_STEPS + steps`` steps on uint8 ``(N, 1, H, W)`` ``images``.

    Returns ``{"img_per_s": ..., "peak_mem_bytes": ...}`` over the steps after warm-up
    (CUDA-synchronized; peak memory on CUDA only, else 0). Needs ``N >= batch_size * (steps + 3)``.
    """
    device = torch.device(device)
    needed = batch_size * (steps + WARMUP_STEPS)
    if images.shape[0] < needed:
        raise ValueError(f"images: found {images.shape[0]}, expected at least batch_size * (steps + 3) = {needed}")
    model = seed_model(backbone, images.shape[1], images.shape[-1]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=SEED_LR)
    loader = make_seed_loader(images[:needed].cpu(), batch_size=batch_size, num_workers=num_workers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seen, start = 0, 0.0
    for step, (view1, view2) in enumerate(loader):
        if step == WARMUP_STEPS:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        view1, view2 = view1.to(device), view2.to(device)
        loss = nt_xent(model(view1), model(view2), temperature=SEED_TEMPERATURE, impl="reference")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= WARMUP_STEPS:
            seen += view1.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peak = float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0.0
    return {"img_per_s": seen / elapsed, "peak_mem_bytes": peak}
