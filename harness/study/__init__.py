"""Running studies: expand grids and ablations into trials, drive Optuna searches, claim trials
atomically in the database, heartbeat them, resume after a crash, and run several workers.

Modules (imports point down this list only): ``runner`` (``run_study``, worker processes) ->
``kinds`` (which kind runs a study) -> ``grid``, ``search`` (the two kinds) -> ``worker`` (the one
worker loop and the ``StudyKind``/``TrialSource`` interface) -> ``liveness``, ``store`` (the
database side); ``overview`` (``harness status``, ``--dry-run``) reads beside them.

``run_study(study, RunOptions(...))`` is what ``harness run`` does. Importing this package
imports neither torch nor Optuna; a worker imports them when it starts training or searching.
"""

from __future__ import annotations

from harness.db import open_existing
from harness.study.overview import UnknownStudy, dry_run_lines, status_lines
from harness.study.runner import RunResult, describe_sync, run_study, worker_devices
from harness.study.search import SearchSetupError, search_problems
from harness.study.store import (
    Claim,
    StudyConflict,
    SyncReport,
    claim_next,
    claim_row,
    finish,
    heartbeat,
    release,
    sync_study,
    worker_name,
)
from harness.study.worker import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    Finished,
    Job,
    RunOptions,
    RunTally,
    StudyKind,
    TrialSource,
    WorkerEvents,
)

__all__ = [
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "Claim",
    "Finished",
    "Job",
    "RunOptions",
    "RunResult",
    "RunTally",
    "SearchSetupError",
    "StudyConflict",
    "StudyKind",
    "SyncReport",
    "TrialSource",
    "UnknownStudy",
    "WorkerEvents",
    "claim_next",
    "claim_row",
    "describe_sync",
    "dry_run_lines",
    "finish",
    "heartbeat",
    "open_existing",
    "release",
    "run_study",
    "search_problems",
    "status_lines",
    "sync_study",
    "worker_devices",
    "worker_name",
]
