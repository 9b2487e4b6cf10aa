"""Where a study's checkpoints and weights live, how much disk they take, and the curve points a
running trial hands over for the database (torch-free: the study layer's side of checkpoints;
``harness.checkpoint`` writes the files)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from harness.db import sqlite_file
from harness.spec import KEEPING_KNOBS, KNOBS, Study, TrialConfig, method_declarations

CurvePoint = tuple[float, int, str, float]
# Beside the default database, and under the working directory for a server database.
SERVER_DATABASE_ROOT = Path("results") / "harness-checkpoints"


def checkpoint_root(db_url: str | Path | None, override: str | Path | None = None) -> Path:
    """The folder under which every study's trial folders go: ``override`` (``--checkpoint-dir``
    or the ``checkpoint_dir`` knob) when given, else beside a SQLite file (``X/NAME.db`` ->
    ``X/NAME-checkpoints``), else :data:`SERVER_DATABASE_ROOT`. Absolute, so that the path
    recorded on a trial does not depend on the directory a later command runs in."""
    if override is not None:
        return Path(override).expanduser().absolute()
    database = sqlite_file(db_url)
    if database is None:
        return SERVER_DATABASE_ROOT.absolute()
    return database.absolute().with_name(f"{database.stem}-checkpoints")


def with_current_keeping_knobs(config: TrialConfig, study: Study) -> TrialConfig:
    """``config`` with the :data:`KEEPING_KNOBS` as ``study``'s file sets them now (their defaults
    where it does not), except those the study sweeps and, for a method that does not train
    (random_init), the training ones (its configuration keeps their defaults, as ``resolve`` does)."""
    trains = method_declarations()[config.method].trains if config.method in method_declarations() else True
    values = {
        name: study.fixed.get(name, KNOBS[name].default)
        for name in KEEPING_KNOBS
        if name not in study.swept_knobs and (trains or not KNOBS[name].training)
    }
    return config.replace(**values)


def trial_folder(root: Path, study: str, trial_id: int) -> Path:
    """``ROOT/STUDY/trial-ID``: study names are file-name safe (harness.spec checks them)."""
    return Path(root) / study / f"trial-{trial_id}"


def folder_bytes(folders: Iterable[str | Path]) -> int:
    """Bytes of the files under each folder that exists (each counted once)."""
    total = 0
    for folder in dict.fromkeys(str(f) for f in folders):
        for parent, _, files in os.walk(folder):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(parent, name)).st_size
    return total


class LiveCurves:
    """Curve points of the running trial, handed from the training loop (``add``, cheap, no
    database) to the heartbeat thread (``take``), which writes them in its short transaction.
    ``first`` is true until the first ``take``: the trial's earlier rows (a previous attempt's)
    are then replaced, since a resumed trial hands over every point restored from its checkpoint."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._points: list[CurvePoint] = []
        self.first = True

    def add(self, points: Sequence[CurvePoint]) -> None:
        with self._lock:
            self._points.extend(points)

    def take(self) -> tuple[list[CurvePoint], bool]:
        """The points not yet taken, and whether the trial's stored rows are to be replaced."""
        with self._lock:
            points, self._points = self._points, []
            replace, self.first = self.first, False
        return points, replace

    def give_back(self, points: Sequence[CurvePoint], replace: bool) -> None:
        """Points whose write failed (a busy database): the next beat writes them first."""
        with self._lock:
            self._points[:0] = points
            self.first = self.first or replace
