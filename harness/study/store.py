"""The database side of running a study, one short transaction per step.

Registering a study and its trials, claiming one trial at a time, heartbeats and writing results
all go through ``Database.run`` (one transaction, retried while SQLite reports the file locked).
Claims are conditional UPDATEs: a row changes hands only if it is still in the state the claimer
saw, so several processes (on one machine or several sharing a database) never run one trial
twice. A claim is identified by (row, worker, attempts): a reclaimed trial's old owner, if it is
still alive, can neither heartbeat nor write its result.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from harness.db import (
    PROVENANCE_FIELDS,
    SUMMARY_METRICS,
    Database,
    DatabaseProblem,
    MetricRow,
    StudyRow,
    TrialRow,
    sqlite_file,
    utcnow,
)
from harness.runtime import retry, write_atomically
from harness.spec import KNOB_NAMES, Study, TrialConfig

# The trial columns of checkpoints and weights that a result sets.
ARTIFACT_COLUMNS: tuple[str, ...] = ("checkpoint_dir", "weights_path", "weights_sha256")
# A transaction that loses an insert race (two processes registering one study) is retried once:
# the second attempt sees the winner's rows.
_INTEGRITY_RETRIES = 3


class StudyConflict(Exception):
    """The study file cannot be reconciled with what the database holds under its name."""


@dataclass(frozen=True)
class SyncReport:
    """What registering a study file changed in the database."""

    study_id: int
    created: bool
    file_changed: bool
    added: tuple[str, ...]  # labels of the trials inserted now
    kept: int  # trials of the file that were already in the database
    kept_finished: int  # ... of which have a result (complete, failed or pruned)
    gone: tuple[str, ...]  # labels of trials in the database that the file no longer has
    row_ids: tuple[int, ...] | None  # the rows the file asks for; None for a search (all rows)
    # Results an earlier run kept in files while the database did not answer, written now.
    kept_results: tuple[str, ...] = ()


@dataclass(frozen=True)
class Claim:
    """One trial this worker owns until it writes a result or releases it."""

    row_id: int
    worker: str
    attempts: int
    config: Mapping[str, Any]
    seed: int
    previous_status: str
    previous_worker: str | None
    optuna_number: int | None

    def trial_config(self, device: str | None = None) -> TrialConfig:
        # Knobs a newer TrialConfig no longer has are dropped; new ones take their defaults.
        config = TrialConfig(**{k: v for k, v in self.config.items() if k in KNOB_NAMES})
        return config.replace(device=device) if device else config


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def naive_utc(moment: datetime | None) -> datetime | None:
    """The database stores naive UTC times (``utcnow``); accept aware ones too."""
    if moment is None or moment.tzinfo is None:
        return moment
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


def format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_label(config: Mapping[str, Any], knobs: Sequence[str]) -> str:
    parts = [f"{k}={format_value(config.get(k))}" for k in knobs if k != "seed"]
    parts.append(f"seed={config.get('seed')}")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# Registering a study


def check_kind(db: Database, study: Study) -> None:
    """Raise StudyConflict (writing nothing) when the name belongs to a study of the other
    family: a search cannot become a grid or an ablation, nor the reverse."""
    kind = db.run(lambda session: session.scalar(select(StudyRow.kind).where(StudyRow.name == study.name)))
    if kind is not None and (kind == "search") != (study.kind == "search"):
        raise StudyConflict(_conflict_message(study, kind))


def _conflict_message(study: Study, stored_kind: str) -> str:
    return (
        f"study {study.name!r} is in the database as a {stored_kind}; the file makes it a "
        f"{study.kind}. A study cannot change between search and grid/ablate: rename it."
    )


def sync_study(db: Database, study: Study) -> SyncReport:
    """Create or update the study's row and insert its missing trials as pending, then write the
    results an earlier run kept in files while the database did not answer (``kept_results``).

    Existing trials keep their rows and results; trials the file no longer has stay in the
    database (reported in ``gone``) and are not run. Raises StudyConflict when the name belongs to
    a study of the other family (search vs grid/ablation).
    """
    planned = study.trials() if study.search is None else []
    report = retry(
        lambda: db.run(lambda session: _sync(session, study, planned)),
        attempts=_INTEGRITY_RETRIES,
        transient=lambda error: isinstance(error, IntegrityError),
    )
    kept = write_kept_results(db)
    return replace(report, kept_results=tuple(kept)) if kept else report


def _sync(session: Session, study: Study, planned: Sequence[TrialConfig]) -> SyncReport:
    row = session.scalar(select(StudyRow).where(StudyRow.name == study.name))
    created = row is None
    file_changed = False
    if row is None:
        row = StudyRow(
            name=study.name,
            kind=study.kind,
            description=study.description,
            file_text=study.text,
            file_hash=study.text_hash,
        )
        session.add(row)
        session.flush()
    else:
        if (row.kind == "search") != (study.kind == "search"):
            raise StudyConflict(_conflict_message(study, row.kind))
        file_changed = row.file_hash != study.text_hash
        if file_changed:
            row.kind = study.kind
            row.description = study.description
            row.file_text = study.text
            row.file_hash = study.text_hash
            row.updated_at = utcnow()
    existing = session.execute(
        select(TrialRow.id, TrialRow.config_hash, TrialRow.seed, TrialRow.status, TrialRow.config).where(
            TrialRow.study_id == row.id
        )
    ).all()
    if study.search is not None:
        return SyncReport(row.id, created, file_changed, (), len(existing), 0, (), None)

    knobs = study.swept_knobs
    by_key = {(r.config_hash, r.seed): r for r in existing}
    wanted = {(c.config_hash, c.seed) for c in planned}
    missing = [c for c in planned if (c.config_hash, c.seed) not in by_key]
    if missing:
        session.execute(
            insert(TrialRow),
            [
                {
                    "study_id": row.id,
                    "config": c.to_dict(),
                    "config_hash": c.config_hash,
                    "seed": c.seed,
                    "status": "pending",
                    "attempts": 0,
                    "created_at": utcnow(),
                }
                for c in missing
            ],
        )
    kept = [r for key, r in by_key.items() if key in wanted]
    gone = [r for key, r in by_key.items() if key not in wanted]
    if missing and gone:
        # A change to fixed: makes new configurations whose swept knobs read the same as the old
        # ones'; name the knobs that tell the added trials from the gone ones too.
        added_configs = [c.to_dict() for c in missing]
        gone_configs = [dict(r.config) for r in gone]
        names = dict.fromkeys(k for c in added_configs + gone_configs for k in c if k not in ("seed", "device"))
        knobs = tuple(knobs) + tuple(
            k
            for k in names
            if k not in knobs
            and {repr(c.get(k)) for c in added_configs} != {repr(c.get(k)) for c in gone_configs}
        )
    rows_now = session.execute(
        select(TrialRow.id, TrialRow.config_hash, TrialRow.seed).where(TrialRow.study_id == row.id)
    ).all()
    row_ids = tuple(sorted(r.id for r in rows_now if (r.config_hash, r.seed) in wanted))
    return SyncReport(
        study_id=row.id,
        created=created,
        file_changed=file_changed,
        added=tuple(trial_label(c.to_dict(), knobs) for c in missing),
        kept=len(kept),
        kept_finished=sum(r.status in ("complete", "failed", "pruned") for r in kept),
        gone=tuple(trial_label(r.config, knobs) for r in gone),
        row_ids=row_ids,
    )


def existing_rows(db: Database, study_name: str) -> dict[tuple[str, int], str] | None:
    """(config hash, seed) -> status of a study's trials; None if the database lacks the study or
    its tables (read-only: for ``--dry-run``)."""

    def query(session: Session) -> dict[tuple[str, int], str] | None:
        study_id = session.scalar(select(StudyRow.id).where(StudyRow.name == study_name))
        if study_id is None:
            return None
        rows = session.execute(
            select(TrialRow.config_hash, TrialRow.seed, TrialRow.status).where(TrialRow.study_id == study_id)
        ).all()
        return {(r.config_hash, r.seed): r.status for r in rows}

    return db.run(query)


# ----------------------------------------------------------------------------------------------
# Claiming


def claim_next(
    db: Database,
    study_id: int,
    worker: str,
    *,
    stale_before: datetime,
    row_ids: Iterable[int] | None = None,
    retry_failed_before: datetime | None = None,
    optuna_number: int | None = None,
) -> Claim | None:
    """Atomically take the next runnable trial: pending, running with a heartbeat older than
    ``stale_before`` (its worker died), or, with ``retry_failed_before``, failed before then."""
    ids = None if row_ids is None else tuple(row_ids)

    def work(session: Session) -> Claim | None:
        runnable = [
            TrialRow.status == "pending",
            and_(
                TrialRow.status == "running",
                or_(TrialRow.heartbeat.is_(None), TrialRow.heartbeat < stale_before),
            ),
        ]
        if retry_failed_before is not None:
            runnable.append(
                and_(
                    TrialRow.status == "failed",
                    or_(TrialRow.ended_at.is_(None), TrialRow.ended_at < retry_failed_before),
                )
            )
        statement = (
            select(TrialRow.id, TrialRow.status, TrialRow.attempts)
            .where(TrialRow.study_id == study_id, or_(*runnable))
            .order_by(TrialRow.id)
            .limit(16)
        )
        if ids is not None:
            statement = statement.where(TrialRow.id.in_(ids))
        for candidate in session.execute(statement).all():
            claim = _take(
                session,
                candidate.id,
                candidate.status,
                candidate.attempts,
                worker,
                stale_before,
                optuna_number,
            )
            if claim is not None:
                return claim
        return None

    return db.run(work)


def claim_row(
    db: Database,
    row_id: int,
    worker: str,
    *,
    stale_before: datetime,
    retry_failed: bool = False,
    optuna_number: int | None = None,
) -> Claim | None:
    """Take one given trial if it is runnable (pending, stale, or failed with ``retry_failed``)."""

    def work(session: Session) -> Claim | None:
        current = session.execute(
            select(TrialRow.status, TrialRow.attempts, TrialRow.heartbeat).where(TrialRow.id == row_id)
        ).one_or_none()
        if current is None:
            return None
        runnable = current.status == "pending" or (current.status == "failed" and retry_failed)
        if current.status == "running":
            runnable = current.heartbeat is None or current.heartbeat < stale_before
        if not runnable:
            return None
        return _take(session, row_id, current.status, current.attempts, worker, stale_before, optuna_number)

    return db.run(work)


def _take(
    session: Session,
    row_id: int,
    status: str,
    attempts: int,
    worker: str,
    stale_before: datetime,
    optuna_number: int | None,
) -> Claim | None:
    previous = session.execute(
        select(TrialRow.worker, TrialRow.config, TrialRow.seed, TrialRow.optuna_number).where(
            TrialRow.id == row_id
        )
    ).one()
    now = utcnow()
    conditions = [TrialRow.id == row_id, TrialRow.status == status, TrialRow.attempts == attempts]
    if status == "running":
        # Re-checked here: the owner may have sent a heartbeat since the candidate was read.
        conditions.append(or_(TrialRow.heartbeat.is_(None), TrialRow.heartbeat < stale_before))
    values: dict[str, Any] = {
        "status": "running",
        "worker": worker,
        "heartbeat": now,
        "started_at": now,
        "ended_at": None,
        "reason": None,
        "attempts": attempts + 1,
    }
    if optuna_number is not None:
        values["optuna_number"] = optuna_number
    result = session.execute(update(TrialRow).where(*conditions).values(**values))
    if result.rowcount != 1:
        return None
    return Claim(
        row_id=row_id,
        worker=worker,
        attempts=attempts + 1,
        config=dict(previous.config),
        seed=previous.seed,
        previous_status=status,
        previous_worker=previous.worker,
        optuna_number=optuna_number if optuna_number is not None else previous.optuna_number,
    )


def insert_running(
    db: Database,
    study_id: int,
    config: Mapping[str, Any],
    config_hash: str,
    seed: int,
    worker: str,
    optuna_number: int,
) -> Claim | None:
    """A new trial row (a search's sample), claimed by ``worker``; None if the study already has
    this configuration and seed (inserted by another process meanwhile)."""

    def work(session: Session) -> Claim:
        now = utcnow()
        result = session.execute(
            insert(TrialRow).values(
                study_id=study_id,
                config=dict(config),
                config_hash=config_hash,
                seed=seed,
                status="running",
                worker=worker,
                heartbeat=now,
                started_at=now,
                attempts=1,
                optuna_number=optuna_number,
                created_at=now,
            )
        )
        row_id = int(result.inserted_primary_key[0])
        return Claim(row_id, worker, 1, dict(config), seed, "new", None, optuna_number)

    try:
        return db.run(work)
    except IntegrityError:
        return None


def insert_failed(
    db: Database,
    study_id: int,
    config: Mapping[str, Any],
    config_hash: str,
    seed: int,
    reason: str,
    optuna_number: int,
) -> bool:
    """Record a sample that could not even be configured (a failed result, not a crash)."""

    def work(session: Session) -> None:
        now = utcnow()
        session.execute(
            insert(TrialRow).values(
                study_id=study_id,
                config=dict(config),
                config_hash=config_hash,
                seed=seed,
                status="failed",
                reason=reason,
                worker=worker_name(),
                started_at=now,
                ended_at=now,
                attempts=1,
                optuna_number=optuna_number,
                created_at=now,
            )
        )

    try:
        db.run(work)
    except IntegrityError:
        return False
    return True


def find_row(db: Database, study_id: int, config_hash: str, seed: int) -> dict[str, Any] | None:
    """The study's row for one configuration and seed, as a plain dict (status, metrics, ...)."""

    def query(session: Session) -> dict[str, Any] | None:
        row = session.scalar(
            select(TrialRow).where(
                TrialRow.study_id == study_id, TrialRow.config_hash == config_hash, TrialRow.seed == seed
            )
        )
        if row is None:
            return None
        return {c.name: getattr(row, c.name) for c in TrialRow.__table__.columns}

    return db.run(query)


def live_running(
    db: Database, study_id: int, *, stale_before: datetime, row_ids: Iterable[int] | None = None
) -> int:
    """How many of the study's trials other workers are running with a fresh heartbeat."""
    ids = None if row_ids is None else tuple(row_ids)

    def query(session: Session) -> int:
        statement = select(func.count(TrialRow.id)).where(
            TrialRow.study_id == study_id, TrialRow.status == "running", TrialRow.heartbeat >= stale_before
        )
        if ids is not None:
            statement = statement.where(TrialRow.id.in_(ids))
        return int(session.scalar(statement) or 0)

    return db.run(query)


def live_running_rows(
    db: Database, study_id: int, *, stale_before: datetime, row_ids: Iterable[int] | None = None
) -> list[Any]:
    """(id, worker, attempts, heartbeat) of the study's running trials with a fresh heartbeat."""
    ids = None if row_ids is None else tuple(row_ids)

    def query(session: Session) -> list[Any]:
        statement = select(TrialRow.id, TrialRow.worker, TrialRow.attempts, TrialRow.heartbeat).where(
            TrialRow.study_id == study_id, TrialRow.status == "running", TrialRow.heartbeat >= stale_before
        )
        if ids is not None:
            statement = statement.where(TrialRow.id.in_(ids))
        return list(session.execute(statement.order_by(TrialRow.id)).all())

    return db.run(query)


def claim_running(db: Database, row_id: int, worker: str, *, attempts: int) -> Claim | None:
    """Take over a running trial whatever its heartbeat, if it is still the claim ``attempts`` (its
    owner was found dead by other means than the heartbeat; see ``liveness``)."""
    far_future = utcnow() + timedelta(days=365)
    return db.run(lambda session: _take(session, row_id, "running", attempts, worker, far_future, None))


def optuna_numbers(db: Database, study_id: int) -> set[int]:
    """The Optuna trial numbers that the study's rows point at."""
    statement = select(TrialRow.optuna_number).where(
        TrialRow.study_id == study_id, TrialRow.optuna_number.is_not(None)
    )
    return db.run(lambda session: {int(n) for n in session.scalars(statement)})


def status_counts(db: Database, study_id: int, row_ids: Iterable[int] | None = None) -> dict[str, int]:
    ids = None if row_ids is None else tuple(row_ids)

    def query(session: Session) -> dict[str, int]:
        statement = (
            select(TrialRow.status, func.count(TrialRow.id))
            .where(TrialRow.study_id == study_id)
            .group_by(TrialRow.status)
        )
        if ids is not None:
            statement = statement.where(TrialRow.id.in_(ids))
        return {status: int(count) for status, count in session.execute(statement).all()}

    return db.run(query)


# ----------------------------------------------------------------------------------------------
# While a trial runs, and after


def _owned(claim: Claim) -> list[Any]:
    return [
        TrialRow.id == claim.row_id,
        TrialRow.worker == claim.worker,
        TrialRow.attempts == claim.attempts,
        TrialRow.status == "running",
    ]


def set_checkpoint_dir(db: Database, claim: Claim, folder: str) -> bool:
    """Record where the claimed trial keeps its checkpoints (``harness status`` sums their size)."""

    def work(session: Session) -> bool:
        result = session.execute(update(TrialRow).where(*_owned(claim)).values(checkpoint_dir=folder))
        return result.rowcount == 1

    return db.run(work)


def heartbeat(
    db: Database,
    claim: Claim,
    *,
    points: Sequence[tuple[float, int, str, float]] = (),
    replace_points: bool = False,
) -> bool:
    """Refresh the claim's heartbeat and add the running trial's new curve ``points`` (with
    ``replace_points``, its stored points are dropped first: an earlier attempt's); False, with
    nothing written, when the claim was lost (reclaimed by another worker)."""
    rows = _metric_rows(claim.row_id, points)

    def work(session: Session) -> bool:
        result = session.execute(update(TrialRow).where(*_owned(claim)).values(heartbeat=utcnow()))
        if result.rowcount != 1:
            return False
        if replace_points:
            session.execute(delete(MetricRow).where(MetricRow.trial_id == claim.row_id))
        if rows:
            session.execute(insert(MetricRow), rows)
        return True

    return db.run(work)


def _metric_rows(trial_id: int, curves: Sequence[tuple[float, int, str, float]]) -> list[dict[str, Any]]:
    return [
        {"trial_id": trial_id, "epoch": float(epoch), "step": int(step), "name": str(name), "value": _as_float(value)}
        for epoch, step, name, value in curves
    ]


def set_optuna_number(db: Database, claim: Claim, number: int) -> bool:
    """Point the claimed trial at the Optuna trial that now runs it."""

    def work(session: Session) -> bool:
        result = session.execute(update(TrialRow).where(*_owned(claim)).values(optuna_number=number))
        return result.rowcount == 1

    return db.run(work)


def release(db: Database, claim: Claim, reason: str = "interrupted") -> bool:
    """Hand the trial back as pending (to be rerun), if this worker still owns it."""

    def work(session: Session) -> bool:
        result = session.execute(
            update(TrialRow).where(*_owned(claim)).values(status="pending", reason=reason)
        )
        return result.rowcount == 1

    return db.run(work)


def _as_float(value: Any) -> float | None:
    """A metric value as a float. NaN stays NaN (a diverged metric is a result); SQLite stores
    it as NULL, PostgreSQL as NaN."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def finish(
    db: Database,
    claim: Claim,
    *,
    status: str,
    reason: str | None,
    summary: Mapping[str, Any],
    curves: Sequence[tuple[float, int, str, float]],
    provenance: Mapping[str, Any],
    started_at: datetime | None,
    ended_at: datetime | None,
    config: Mapping[str, Any] | None = None,
    say: Callable[[str], None] | None = None,
    artifacts: Mapping[str, str | None] | None = None,
    data: Mapping[str, Any] | None = None,
) -> bool:
    """Write a trial's result and curves in one transaction, only if this worker still owns the
    claim; False (nothing written) if it was reclaimed meanwhile. A database that does not answer
    is waited for (:func:`write_result`), the result kept in a file meanwhile. ``artifacts``: the
    trial's ``checkpoint_dir``, ``weights_path`` and ``weights_sha256`` (None clears a stale one).
    ``data`` is what the trial trained and evaluated on (``TrialRecord.data``); an earlier
    attempt's is replaced."""
    values: dict[str, Any] = {
        "status": status,
        "reason": reason,
        "ended_at": naive_utc(ended_at) or utcnow(),
        "data": dict(data) if data else None,
    }
    if started_at is not None:  # else the claim's start time stays
        values["started_at"] = naive_utc(started_at)
    values.update({name: _as_float(summary.get(name)) for name in SUMMARY_METRICS})
    values.update({name: provenance.get(name) for name in PROVENANCE_FIELDS if name in provenance})
    if config is not None:
        values["config"] = dict(config)
    if artifacts is not None:
        values.update({name: artifacts.get(name) for name in ARTIFACT_COLUMNS if name in artifacts})
    points = [
        {"epoch": float(epoch), "step": int(step), "name": str(name), "value": _as_float(value)}
        for epoch, step, name, value in curves
    ]
    return write_result(db, KeptResult(claim, values, points), say=say or _stderr)


# ----------------------------------------------------------------------------------------------
# A database outage at the end of a trial

# How long a finished trial's result waits for a database that does not answer (a PostgreSQL
# server restarting, a network file system away) before the runner gives up: long enough for a
# server restart or a failover, short enough that a dead server is reported within a coffee break.
RESULT_PATIENCE_S = 600.0
# The waits between attempts grow from 1 s to at most this, so a database that comes back is
# used within seconds (before another worker's heartbeat timeout can take the trial over).
RESULT_RETRY_CAP_S = 10.0


class ResultNotWritten(DatabaseProblem):
    """A finished trial's result could not be written before the patience ran out."""


@dataclass(frozen=True)
class KeptResult:
    """A trial's result as it will be written: the claim that owns the row, the row's new values
    and its curve points (without the trial id, which the claim gives)."""

    claim: Claim
    values: Mapping[str, Any]
    points: Sequence[Mapping[str, Any]]

    def to_json(self) -> str:
        def encode(value: Any) -> Any:
            return {"$datetime": value.isoformat()} if isinstance(value, datetime) else value

        claim = {f.name: getattr(self.claim, f.name) for f in fields(Claim)}
        body = {"claim": claim, "values": {k: encode(v) for k, v in self.values.items()}, "points": list(self.points)}
        return json.dumps(body, indent=1)  # NaN and ±inf are written as NaN/Infinity, as Python reads them

    @staticmethod
    def from_json(text: str) -> KeptResult:
        def decode(value: Any) -> Any:
            if isinstance(value, dict) and set(value) == {"$datetime"}:
                return datetime.fromisoformat(value["$datetime"])
            return value

        body = json.loads(text)
        values = {k: decode(v) for k, v in body["values"].items()}
        return KeptResult(Claim(**body["claim"]), values, body["points"])


def _unreachable(error: BaseException) -> bool:
    """The database did not answer (connection refused or lost, an I/O error), as opposed to a
    statement it refused (a missing table, a constraint), which waiting does not mend."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    if not isinstance(error, (OperationalError, InterfaceError)):
        return False
    if type(error.orig).__module__.startswith("sqlite3"):
        text = str(error.orig).lower()
        return any(word in text for word in ("disk i/o", "unable to open", "locked", "busy", "disk is full"))
    return True  # a server's OperationalError: connection refused, closed, terminated, timed out


def kept_results_dir(db: Database) -> Path:
    """Where results wait for the database: beside a SQLite file (``NAME.unwritten/``); for a
    server, ``results/unwritten/<server and database>/`` under the current folder."""
    path = sqlite_file(db.url)
    if path is not None:
        return path.with_name(path.name + ".unwritten")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", db.where.split("://", 1)[-1])[:100]
    return Path("results") / "unwritten" / slug


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _write(db: Database, kept: KeptResult) -> bool:
    claim = kept.claim

    def work(session: Session) -> bool:
        values = {**kept.values, "heartbeat": utcnow()}
        result = session.execute(update(TrialRow).where(*_owned(claim)).values(**values))
        if result.rowcount != 1:
            return False
        # Curves of an earlier attempt (a failed trial rerun with --retry-failed) are replaced.
        session.execute(delete(MetricRow).where(MetricRow.trial_id == claim.row_id))
        if kept.points:
            session.execute(insert(MetricRow), [{**p, "trial_id": claim.row_id} for p in kept.points])
        return True

    return db.run(work)


def write_result(
    db: Database, kept: KeptResult, *, say: Callable[[str], None], patience_s: float | None = None
) -> bool:
    """Write ``kept``; while the database does not answer, keep it in a file (see
    :func:`kept_results_dir`) and retry for ``patience_s`` (default :data:`RESULT_PATIENCE_S`),
    then raise :class:`ResultNotWritten` saying where it is (the next ``harness run`` on this
    database writes it: :func:`write_kept_results`)."""
    try:
        return _write(db, kept)
    except Exception as error:
        if not _unreachable(error):
            raise
        first = error
    patience = RESULT_PATIENCE_S if patience_s is None else patience_s
    row = kept.claim.row_id
    path = kept_results_dir(db) / f"trial-{row}-attempt-{kept.claim.attempts}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda p: p.write_text(kept.to_json(), encoding="utf-8"))
        where = f"kept in {path}"
    except OSError as error:
        path, where = None, f"kept in memory only (writing {path} failed: {error.strerror or error})"
    say(
        f"trial #{row}: the database does not answer ({_first_line(first)}); its result is {where}; "
        f"retrying for up to {patience:g} s"
    )
    started = time.monotonic()
    try:
        written = retry(
            lambda: _write(db, kept), transient=_unreachable, patience_s=patience, base_s=1.0, cap_s=RESULT_RETRY_CAP_S
        )
    except Exception as error:
        if not _unreachable(error):
            raise
        if path is None:
            raise ResultNotWritten(
                f"trial #{row}: the database did not answer for {patience:g} s ({_first_line(error)}) and the "
                "result could not be kept in a file; it is lost, and the trial runs again on the next `harness run`"
            ) from error
        raise ResultNotWritten(
            f"trial #{row}: the database did not answer for {patience:g} s ({_first_line(error)}); the result "
            f"is kept in {path}, and the next `harness run` on this database writes it (nothing is rerun)"
        ) from error
    if path is not None:
        path.unlink(missing_ok=True)
    say(f"trial #{row}: the database answered again after {time.monotonic() - started:.0f} s; result written")
    return written


def _first_line(error: BaseException) -> str:
    orig = getattr(error, "orig", None)
    text = str(orig if orig is not None else error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def write_kept_results(db: Database) -> list[str]:
    """Write the results that an earlier run kept in files while the database did not answer;
    one line per file for the terminal. A result whose trial was taken over meanwhile (another
    worker reran it) is dropped: the row has a newer attempt."""
    folder = kept_results_dir(db)
    if not folder.is_dir():
        return []
    lines: list[str] = []
    for path in sorted(folder.glob("trial-*.json")):
        try:
            kept = KeptResult.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError) as error:
            lines.append(f"{path}: not a kept result ({error}); left alone")
            continue
        row = kept.claim.row_id
        if _write(db, kept):
            _tell_optuna(db, kept)
            lines.append(f"trial #{row}: wrote the result kept in {path} while the database did not answer")
        else:
            lines.append(f"trial #{row}: another worker took the trial over meanwhile; dropped the result kept in {path}")
        path.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()
    return lines


def _tell_optuna(db: Database, kept: KeptResult) -> None:
    """A search's Optuna trial still runs in Optuna's tables (its worker gave up): finish it
    with the written result, so that the sampler sees it."""
    number = kept.claim.optuna_number
    if number is None:
        return
    study = db.run(
        lambda s: s.execute(
            select(StudyRow.name, StudyRow.file_text).join(TrialRow).where(TrialRow.id == kept.claim.row_id)
        ).one()
    )
    import optuna
    import yaml

    metric = ((yaml.safe_load(study.file_text) or {}).get("search") or {}).get("objective", {}).get("metric")
    storage = optuna.storages.RDBStorage(db.url)
    states = optuna.trial.TrialState
    try:
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.name), number)
        if storage.get_trial(trial_id).state != states.RUNNING:
            return
        value = _as_float(kept.values.get(metric)) if metric else None
        if kept.values.get("status") == "complete" and value is not None and math.isfinite(value):
            storage.set_trial_state_values(trial_id, states.COMPLETE, [value])
        elif kept.values.get("status") == "pruned":
            storage.set_trial_state_values(trial_id, states.PRUNED)
        else:
            storage.set_trial_state_values(trial_id, states.FAIL)
    except (KeyError, RuntimeError):  # gone, or finished by someone else meanwhile
        return
    finally:
        storage.engine.dispose()
