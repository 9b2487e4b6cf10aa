"""The database as pandas DataFrames, for notebooks, reports and exports (no torch import)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import inspect, select

from harness.db import (
    PROVENANCE_FIELDS,
    SUMMARY_METRICS,
    BenchRow,
    Database,
    EvaluationRow,
    MetricRow,
    StudyRow,
    TrialRow,
    open_existing,
)

TRIAL_COLUMNS: tuple[str, ...] = (
    "trial_id",
    "study",
    "config_hash",
    "seed",
    "status",
    "reason",
    "worker",
    "attempts",
    "optuna_number",
    "created_at",
    "started_at",
    "ended_at",
    *PROVENANCE_FIELDS,
    *SUMMARY_METRICS,
    "data",
)


def as_database(db: Database | str | Path | None) -> Database:
    """An existing results database (``open_existing``: a missing SQLite file is an error)."""
    return db if isinstance(db, Database) else open_existing(db)


def trials_frame(db: Database | str | Path | None = None, study: str | None = None) -> pd.DataFrame:
    """One row per trial: identity, status, provenance, the summary metrics, ``data`` (what the
    trial trained and evaluated on, a dict with ``pretrain``, ``knn_probe_train`` and
    ``knn_probe_test``, each giving ``dataset``, ``split``, ``images``, ``labeled``, ``shape``,
    ``streamed``, ``class_counts`` {class name: images} and for prepared folders ``shard``
    {source, fingerprint, resolution, skipped, converted}; None for trials stored before schema
    version 6 or failed before loading data), and the resolved configuration flattened into one
    column per knob (``method``, ``temperature``, ...).

    ``study`` restricts the frame to one study; an unknown name gives an empty frame.
    """
    database = as_database(db)

    def query(session: object) -> list[tuple[TrialRow, str]]:
        statement = select(TrialRow, StudyRow.name).join(StudyRow).order_by(TrialRow.id)
        if study is not None:
            statement = statement.where(StudyRow.name == study)
        return [tuple(row) for row in session.execute(statement)]  # type: ignore[attr-defined]

    rows = database.run(query)
    records = []
    for trial, study_name in rows:
        record = {key: value for key, value in (trial.config or {}).items()}
        record.update({column: getattr(trial, column) for column in TRIAL_COLUMNS if column not in ("trial_id", "study")})
        record["trial_id"] = trial.id
        record["study"] = study_name
        records.append(record)
    if not records:
        return pd.DataFrame(columns=list(TRIAL_COLUMNS))
    frame = pd.DataFrame.from_records(records)
    leading = [c for c in TRIAL_COLUMNS if c in frame.columns]
    return frame[leading + [c for c in frame.columns if c not in leading]]


def metrics_frame(db: Database | str | Path | None = None, study: str | None = None) -> pd.DataFrame:
    """The curves: one row per (trial, epoch, step, name, value), with the trial's study."""
    database = as_database(db)

    def query(session: object) -> list[tuple[int, float, int, str, float | None, str]]:
        statement = (
            select(MetricRow.trial_id, MetricRow.epoch, MetricRow.step, MetricRow.name, MetricRow.value, StudyRow.name)
            .join(TrialRow, MetricRow.trial_id == TrialRow.id)
            .join(StudyRow, TrialRow.study_id == StudyRow.id)
            .order_by(MetricRow.trial_id, MetricRow.name, MetricRow.step)
        )
        if study is not None:
            statement = statement.where(StudyRow.name == study)
        return [tuple(row) for row in session.execute(statement)]  # type: ignore[attr-defined]

    columns = ["trial_id", "epoch", "step", "name", "value", "study"]
    return pd.DataFrame.from_records(database.run(query), columns=columns)


def bench_frame(db: Database | str | Path | None = None) -> pd.DataFrame:
    """Every stored kernel-benchmark row (``harness_bench``), oldest first."""
    database = as_database(db)

    def query(session: object) -> list[BenchRow]:
        return list(session.scalars(select(BenchRow).order_by(BenchRow.created_at, BenchRow.id)))  # type: ignore[attr-defined]

    rows = database.run(query)
    columns = [c.name for c in BenchRow.__table__.columns]
    return pd.DataFrame.from_records([{c: getattr(r, c) for c in columns} for r in rows], columns=columns)


EVALUATION_COLUMNS: tuple[str, ...] = (
    "evaluation_id",
    "trial_id",
    "study",
    "protocol",
    "dataset",
    "transfer",
    "fraction",
    "shots",
    "label_seed",
    "epochs",
    "lr",
    "status",
    "reason",
    "top1",
    "top5",
    "spread",
    "n_train",
    "n_test",
    "seconds",
    "created_at",
    "task_hash",
    "task",
    "details",
)


def evaluations_frame(db: Database | str | Path | None = None, study: str | None = None) -> pd.DataFrame:
    """One row per evaluation of a saved encoder (``harness evaluate``; docs/REPORTS.md, "Evaluation
    protocols"): the trial, the protocol and its typed settings (``protocol``: knn, linear,
    finetune, few_shot_knn or embedding; ``dataset`` evaluated on, ``transfer`` when it is not the
    trial's own; ``fraction`` of the labeled training split, ``shots`` per class, ``label_seed``,
    ``epochs``, ``lr``), ``status`` and ``reason``, the result (``top1``, ``top5`` as fractions;
    ``spread``: the sample std over few-shot draws; ``n_train`` labeled images, ``n_test``), and
    ``task`` (every setting) and ``details`` (adaptation, per-draw values, embedding points) as
    dicts. A database from before evaluations existed gives an empty frame."""
    database = as_database(db)

    def query(session: object) -> list[tuple[EvaluationRow, str]]:
        statement = (
            select(EvaluationRow, StudyRow.name)
            .join(TrialRow, EvaluationRow.trial_id == TrialRow.id)
            .join(StudyRow, TrialRow.study_id == StudyRow.id)
            .order_by(EvaluationRow.trial_id, EvaluationRow.id)
        )
        if study is not None:
            statement = statement.where(StudyRow.name == study)
        return [tuple(row) for row in session.execute(statement)]  # type: ignore[attr-defined]

    if not inspect(database.engine).has_table(EvaluationRow.__tablename__):
        return pd.DataFrame(columns=list(EVALUATION_COLUMNS))
    records = []
    for row, study_name in database.run(query):
        record = {c: getattr(row, c) for c in EVALUATION_COLUMNS if c not in ("evaluation_id", "study")}
        record["evaluation_id"] = row.id
        record["study"] = study_name
        records.append(record)
    return pd.DataFrame.from_records(records, columns=list(EVALUATION_COLUMNS))


def load_encoder(db: Database | str | Path | None, trial_id: int, *, device: str = "cpu") -> Any:
    """The trained encoder of trial ``trial_id`` (its ``encoder.safetensors``, checked against the
    SHA-256 recorded with the trial) as a ``torch.nn.Module`` on ``device``, in eval mode: features
    ``(B, feature_dim)`` of images normalized as its ``encoder.json`` says. Imports torch."""
    from harness.checkpoint import read_encoder
    from harness.weights import trial_weights

    database = as_database(db)
    weights = trial_weights(database, trial_id)
    return read_encoder(weights.check(), expected_sha256=weights.sha256, device=device).module
