"""Text summaries of studies for the terminal: ``harness status`` and ``harness run --dry-run``.

Reads the database with plain queries (no pandas, torch or Optuna import), so it stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from harness.db import Database, MetricRow, StudyRow, TrialRow, utcnow
from harness.spec import SpecError, Study, parse_study
from harness.study import artifacts, search, slurm, store
from harness.study.kinds import kind_of
from harness.units import metric_text

STATUS_ORDER: tuple[str, ...] = ("complete", "running", "pending", "failed", "pruned")
SHOWN_METRICS: tuple[str, ...] = ("knn_top1", "linear_top1", "final_loss")
# Knobs that differ between trials without being what a study compares.
_NOT_COMPARED: frozenset[str] = frozenset({"seed", "device"})


class UnknownStudy(LookupError):
    """No study of that name in the database."""


@dataclass(frozen=True)
class _Objective:
    metric: str
    direction: str


def _objective_of(file_text: str) -> tuple[_Objective, Study | None]:
    try:
        study = parse_study(file_text, source="<stored study file>")
    except SpecError:  # a file stored by an older version of the harness: fall back to the default
        return _Objective("knn_top1", "maximize"), None
    if study.search is not None:
        return _Objective(study.search.metric, study.search.direction), study
    return _Objective("knn_top1", "maximize"), study


def compared_knobs(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The knobs whose value differs between trials (what the labels show), in knob order."""
    if not configs:
        return []
    keys = list(configs[0])
    return [k for k in keys if k not in _NOT_COMPARED and len({repr(c.get(k)) for c in configs}) > 1]


def _ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    seconds = (now - moment).total_seconds()
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def status_lines(
    db: Database, name: str | None = None, *, top: int | None = None, failures: int = 10
) -> list[str]:
    """``harness status``: per study, counts per status, the best trials by the objective, the
    failures with their reasons, and who runs what. ``top`` best trials each (default 5 for one
    study, 3 per study in the overview of all)."""

    def query(session: Session) -> list[tuple[StudyRow, list[TrialRow]]]:
        statement = select(StudyRow).order_by(StudyRow.created_at, StudyRow.id)
        if name is not None:
            statement = statement.where(StudyRow.name == name)
        studies = list(session.scalars(statement))
        result = []
        for study in studies:
            trials = list(
                session.scalars(select(TrialRow).where(TrialRow.study_id == study.id).order_by(TrialRow.id))
            )
            result.append((study, trials))
        return result

    data = db.run(query)
    if name is not None and not data:
        known = db.run(lambda s: list(s.scalars(select(StudyRow.name).order_by(StudyRow.name))))
        raise UnknownStudy(
            f"no study named {name!r} in the database" + (f" (studies: {', '.join(known)})" if known else "")
        )
    if not data:
        return ["no studies in the database yet (`harness run STUDY.yaml` adds one)"]
    lines: list[str] = []
    for study_row, trials in data:
        if lines:
            lines.append("")
        lines.extend(
            _study_lines(
                db,
                study_row,
                trials,
                top=top if top is not None else (5 if name else 3),
                failures=failures if name else 3,
            )
        )
    return lines


def _study_lines(
    db: Database, study_row: StudyRow, trials: list[TrialRow], *, top: int, failures: int
) -> list[str]:
    objective, parsed = _objective_of(study_row.file_text)
    counts = {s: sum(t.status == s for t in trials) for s in STATUS_ORDER}
    count_text = ", ".join(f"{counts[s]} {s}" for s in STATUS_ORDER if counts[s]) or "no trials"
    updated = study_row.updated_at.strftime("%Y-%m-%d %H:%M") if study_row.updated_at else "?"
    lines = [
        f"{study_row.name} ({study_row.kind}, file of {updated} UTC): {len(trials)} trial(s): {count_text}"
    ]
    folders = [t.checkpoint_dir for t in trials if t.checkpoint_dir]
    if folders:
        lines.append(f"  checkpoints and weights: {_size_text(artifacts.folder_bytes(folders))} on disk")
    knobs = (
        list(parsed.swept_knobs) if parsed is not None else compared_knobs([t.config or {} for t in trials])
    )

    def label(trial: TrialRow) -> str:
        parts = [f"{k}={store.format_value((trial.config or {}).get(k))}" for k in knobs]
        parts.append(f"seed={trial.seed}")
        if trial.optuna_number is not None:
            parts.insert(0, f"optuna {trial.optuna_number}")
        return " ".join(parts)

    scored = [
        t
        for t in trials
        if t.status == "complete"
        and isinstance(getattr(t, objective.metric), float)
        and not math.isnan(getattr(t, objective.metric))
    ]
    scored.sort(key=lambda t: getattr(t, objective.metric), reverse=objective.direction == "maximize")
    if scored:
        lines.append(f"  best by {objective.metric} ({objective.direction}):")
        metrics = [objective.metric, *(m for m in SHOWN_METRICS if m != objective.metric)]
        for trial in scored[:top]:
            values = "  ".join(f"{m} {metric_text(m, getattr(trial, m))}" for m in metrics)
            lines.append(f"    #{trial.id}  {label(trial)}  {values}")
    failed = [t for t in trials if t.status == "failed"]
    if failed:
        lines.append("  failed (kept as results; `harness run --retry-failed` reruns them):")
        lines.extend(
            f"    #{t.id}  {label(t)}: {t.reason or 'no reason recorded'}" for t in failed[:failures]
        )
        if len(failed) > failures:
            lines.append(f"    ... and {len(failed) - failures} more")
    running = [t for t in trials if t.status == "running"]
    if running:
        now = utcnow()
        lines.append("  running:")
        lines.extend(
            f"    #{t.id}  {label(t)}: {_progress_text(db, t)}{t.worker}, heartbeat {_ago(t.heartbeat, now)}"
            for t in running[:failures]
        )
    interrupted = [t for t in trials if t.status == "pending" and t.reason]
    if interrupted:
        lines.append(f"  {len(interrupted)} pending trial(s) were {interrupted[0].reason} and will be rerun")
    if parsed is not None and parsed.search is not None:
        lines.extend(_search_budget_lines(db, study_row, parsed.search.n_trials, running=bool(running)))
    lines.extend(slurm.status_lines(db, study_row.id))
    return lines


def _size_text(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _progress_text(db: Database, trial: TrialRow) -> str:
    """Where a running trial is, from the curve points it has written so far (live progress):
    ``epoch 3.4/10, loss 5.123, k-NN 61.2% (epoch 3), `` or nothing before its first point."""

    def query(session: Session) -> tuple[float | None, list[MetricRow | None]]:
        epoch = session.scalar(select(func.max(MetricRow.epoch)).where(MetricRow.trial_id == trial.id))
        latest = [
            session.scalars(
                select(MetricRow)
                .where(MetricRow.trial_id == trial.id, MetricRow.name == name)
                .order_by(MetricRow.step.desc(), MetricRow.id.desc())
                .limit(1)
            ).first()
            for name in ("loss", "knn_top1")
        ]
        return epoch, latest

    epoch, (loss, knn) = db.run(query)
    if epoch is None:
        return ""
    parts = [f"epoch {epoch:.1f}/{(trial.config or {}).get('epochs', '?')}"]
    if loss is not None:
        parts.append(f"loss {metric_text('final_loss', loss.value)}")
    if knn is not None:
        parts.append(f"k-NN {metric_text('knn_top1', knn.value)} (epoch {knn.epoch:g})")
    return ", ".join(parts) + ", "


def _search_budget_lines(db: Database, study_row: StudyRow, n_trials: int, *, running: bool) -> list[str]:
    """How much of ``n_trials`` the search has used, and what to do when it is short."""
    used = search.trials_used_in_database(db, study_row.name, study_row.id)
    if used is None:
        return [f"  n_trials: 0 of {n_trials} used (the Optuna study is not in this database yet)"]
    line = f"  n_trials: {used} of {n_trials} used"
    if used >= n_trials:
        return [line]
    if running:
        return [line + " (trials are running)"]
    missing = n_trials - used
    return [
        line + f": the search is {missing} trial(s) short of n_trials; `harness run` its study file "
        "again to finish it"
    ]


def dry_run_lines(study: Study, existing: Mapping[tuple[str, int], str] | None) -> list[str]:
    """``harness run --dry-run``: the expanded trials (and notes), marked with their state in the
    database when it has the study. Writes nothing."""
    return kind_of(study).dry_run_lines(existing)
