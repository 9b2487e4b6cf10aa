"""Where a result came from: git commit and dirty flag, torch/CUDA versions, device and host."""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# Folders of generated output that do not count as local changes: the committed example reports
# are rewritten by `harness report` (and `bash scripts/setup.sh quickstart`), which changes no code.
# Without this, every trial run after a report would be recorded as from a dirty checkout.
GENERATED_PATHS: tuple[str, ...] = ("reports",)


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout the package runs from; (None, None) outside git. Dirty means
    a tracked file outside GENERATED_PATHS differs from the commit."""
    return checkout_state(REPO_ROOT)


def checkout_state(root: Path) -> tuple[str | None, bool | None]:
    """``git_state`` of the checkout at ``root`` (uncached)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                *(f":(top,exclude){path}" for path in GENERATED_PATHS),
            ],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(status.strip())


def device_name(device: str) -> str:
    """A readable name of a torch device: the CUDA card's name, or the CPU's model."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu: {platform.processor() or platform.machine()} x{_cpu_count()}"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def collect(device: str = "cpu") -> dict[str, Any]:
    """The provenance columns shared by ``harness_trial`` and ``harness_bench``."""
    import torch

    commit, dirty = git_state()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "device_name": device_name(device),
        "host": socket.gethostname(),
    }
