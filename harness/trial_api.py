"""The contract between one trial and whatever runs it, without torch.

``harness.train.run_trial`` implements ``TrialRunner``; the study layer (which must not import torch)
calls it and raises ``TrialPruned`` from its ``on_eval`` callback to stop a trial early. Both sides
import these names from here, so neither has to import the other's heavy dependencies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class TrialPruned(Exception):
    """Raised by an ``on_eval`` callback to stop a trial early (Optuna pruning)."""


class Interrupted(KeyboardInterrupt):
    """An interrupt by the signal ``signum`` (SIGINT, SIGTERM); ``harness run`` exits with
    128 + ``signum`` (130 after Ctrl-C, 143 after SIGTERM). A KeyboardInterrupt, so that whatever
    handles Ctrl-C handles it."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"interrupted by signal {signum}")
        self.signum = signum


CurvePoints = list[tuple[float, int, str, float]]  # (epoch, step, name, value)


class TrialRunner(Protocol):
    """``harness.train.run_trial``'s signature (injectable, for tests).

    ``checkpoint_dir``: the trial's own folder (checkpoints, resume, weights); ``on_curves``:
    receives the curve points as the trial makes them (first those restored from a checkpoint);
    ``say``: one line per resume and per checkpoint skipped. The record it returns may carry
    ``checkpoint_dir``, ``weights_path`` and ``weights_sha256``."""

    def __call__(
        self,
        config: Any,
        *,
        on_eval: Callable[[int, float], None] | None = None,
        progress: bool | None = None,
        checkpoint_dir: str | None = None,
        on_curves: Callable[[CurvePoints], None] | None = None,
        say: Callable[[str], None] | None = None,
    ) -> Any: ...


__all__ = ["CurvePoints", "Interrupted", "TrialPruned", "TrialRunner"]
