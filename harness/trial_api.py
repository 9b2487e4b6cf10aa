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


class TrialRunner(Protocol):
    """``harness.train.run_trial``'s signature (injectable, for tests)."""

    def __call__(
        self,
        config: Any,
        *,
        on_eval: Callable[[int, float], None] | None = None,
        progress: bool | None = None,
    ) -> Any: ...


__all__ = ["TrialPruned", "TrialRunner"]
