"""The study-level progress line of ``harness run``: after each trial, how far the study is
(done / running / pending / failed of the total), the elapsed time, an ETA from the trial times
measured in this run, and the best result so far with its trial.

It reads the database (so it counts every worker's trials, on this machine or others) and is a
``WorkerEvents`` hook: the worker loop knows nothing about it. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from harness.db import TrialRow, utcnow
from harness.study import store
from harness.study.store import Claim
from harness.study.worker import Finished, WorkerContext, WorkerEvents
from harness.units import metric_text

FINISHED_STATES = ("complete", "failed", "pruned")


def duration_text(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@dataclass(frozen=True)
class Snapshot:
    """What the progress line is computed from (one database read)."""

    counts: Mapping[str, int]
    total: int  # the trials the study will have: its rows, or a search's n_trials
    durations: tuple[float, ...]  # seconds of the trials finished since this run started
    best: tuple[int, str, float] | None  # (trial id, metric, value) of the best complete trial
    elapsed: float
    workers: int


def progress_line(snapshot: Snapshot) -> str:
    """The line itself (pure, for tests)."""
    counts = snapshot.counts
    done = sum(counts.get(s, 0) for s in FINISHED_STATES)
    running, pending = counts.get("running", 0), counts.get("pending", 0)
    remaining = max(0, snapshot.total - done)
    parts = [f"{counts.get(s)} {s}" for s in FINISHED_STATES if counts.get(s)]
    line = f"progress: {done}/{snapshot.total} done" + (f" ({', '.join(parts)})" if parts else "")
    line += f", {running} running, {max(pending, remaining - running)} pending"
    line += f"; elapsed {duration_text(snapshot.elapsed)}"
    if remaining == 0:
        line += ", nothing left"
    elif snapshot.durations:
        mean = sum(snapshot.durations) / len(snapshot.durations)
        # Trials running elsewhere right now are other workers (other processes, other machines).
        parallel = max(1, snapshot.workers, running + 1)
        eta = mean * math.ceil(remaining / parallel)
        line += (
            f", ETA ~{duration_text(eta)} ({duration_text(mean)} per trial, measured over "
            f"{len(snapshot.durations)}{f', {parallel} workers' if parallel > 1 else ''})"
        )
    else:
        line += ", ETA after the first trial"
    if snapshot.best is not None:
        trial_id, metric, value = snapshot.best
        line += f"; best {metric} {metric_text(metric, value)} (trial #{trial_id})"
    return line


def _objective(ctx: WorkerContext) -> tuple[str, bool]:
    search = ctx.study.search
    if search is not None:
        return search.metric, search.direction == "maximize"
    return "knn_top1", True


def snapshot(ctx: WorkerContext, *, now: datetime | None = None) -> Snapshot:
    metric, maximize = _objective(ctx)
    ids = None if ctx.row_ids is None else tuple(ctx.row_ids)
    started = ctx.started

    def query(session: Any) -> tuple[list[tuple[Any, Any]], tuple[int, float] | None]:
        finished = select(TrialRow.started_at, TrialRow.ended_at).where(
            TrialRow.study_id == ctx.study_id,
            TrialRow.status.in_(FINISHED_STATES),
            TrialRow.ended_at >= started,
        )
        column = getattr(TrialRow, metric)
        best_query = (
            select(TrialRow.id, column)
            .where(TrialRow.study_id == ctx.study_id, TrialRow.status == "complete", column.is_not(None))
            .order_by(column.desc() if maximize else column.asc(), TrialRow.id)
        )
        if ids is not None:
            finished = finished.where(TrialRow.id.in_(ids))
            best_query = best_query.where(TrialRow.id.in_(ids))
        times = list(session.execute(finished).all())
        best = None
        for row_id, value in session.execute(best_query.limit(20)).all():
            if value is not None and math.isfinite(float(value)):  # PostgreSQL keeps NaN, which sorts first
                best = (int(row_id), float(value))
                break
        return times, best

    times, best = ctx.db.run(query)
    counts = store.status_counts(ctx.db, ctx.study_id, ctx.row_ids)
    total = sum(counts.values())
    if ctx.study.search is not None:
        total = max(total, ctx.study.search.n_trials)
    durations = tuple(
        (end - start).total_seconds() for start, end in times if start is not None and end is not None
    )
    return Snapshot(
        counts=counts,
        total=total,
        durations=durations,
        best=None if best is None else (best[0], metric, best[1]),
        elapsed=((now or utcnow()) - started).total_seconds(),
        workers=ctx.options.workers,
    )


class StudyProgress(WorkerEvents):
    """Prints the progress line after each trial this worker finishes. Never raises: a failed
    read skips one line."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers  # the command's workers (a spawned worker's options say 1)

    def finished(self, ctx: WorkerContext, claim: Claim, result: Finished | None) -> None:
        try:
            shot = snapshot(ctx)
        except Exception:  # a busy database: the next trial prints the line
            return
        ctx.echo(progress_line(Snapshot(**{**shot.__dict__, "workers": max(shot.workers, self.workers)})))


__all__ = ["Snapshot", "StudyProgress", "duration_text", "progress_line", "snapshot"]
