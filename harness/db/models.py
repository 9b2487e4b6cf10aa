"""SQLAlchemy 2.0 models of the harness's tables (DESIGN.md, "The database").

Every table is prefixed ``harness_`` so that Optuna's own tables can live in the same database.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from harness.metrics import SUMMARY_METRICS

TRIAL_STATUSES: tuple[str, ...] = ("pending", "running", "complete", "failed", "pruned")

PROVENANCE_FIELDS: tuple[str, ...] = (
    "git_commit",
    "git_dirty",
    "torch_version",
    "cuda_version",
    "device_name",
    "host",
)


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Provenance:
    """The columns of ``PROVENANCE_FIELDS``, shared by trials and benchmark rows."""

    git_commit: Mapped[str | None] = mapped_column(String(64))
    git_dirty: Mapped[bool | None] = mapped_column(Boolean)
    torch_version: Mapped[str | None] = mapped_column(String(64))
    cuda_version: Mapped[str | None] = mapped_column(String(64))
    device_name: Mapped[str | None] = mapped_column(String(200))
    host: Mapped[str | None] = mapped_column(String(200))


class StudyRow(Base):
    __tablename__ = "harness_study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    kind: Mapped[str] = mapped_column(String(20), nullable=False)
    description: Mapped[str] = mapped_column(Text, default="")
    file_text: Mapped[str] = mapped_column(Text, nullable=False)
    file_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    trials: Mapped[list[TrialRow]] = relationship(back_populates="study", cascade="all, delete-orphan")


class TrialRow(Provenance, Base):
    __tablename__ = "harness_trial"
    __table_args__ = (
        UniqueConstraint("study_id", "config_hash", "seed", name="uq_trial_study_config_seed"),
        Index("ix_trial_study_status", "study_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("harness_study.id"), nullable=False)
    config: Mapped[dict] = mapped_column(JSON, nullable=False)
    config_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    seed: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False, default="pending")
    reason: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat: Mapped[datetime | None] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    optuna_number: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)
    # What the trial trained and evaluated on (harness.train.describe_data): the pretraining and
    # k-NN/probe splits with image counts, class names and counts, shard fingerprints. NULL for
    # trials stored before schema version 6, and for trials that failed before loading data.
    data: Mapped[dict | None] = mapped_column(JSON)

    # One typed Float column per summary metric (harness.metrics), in its order.
    locals().update({name: mapped_column(name, Float) for name in SUMMARY_METRICS})

    # Checkpoints and weights: the trial's folder (set when it starts), its encoder and the
    # encoder's SHA-256 (set when it completes with save_weights).
    checkpoint_dir: Mapped[str | None] = mapped_column(Text)
    weights_path: Mapped[str | None] = mapped_column(Text)
    weights_sha256: Mapped[str | None] = mapped_column(String(64))

    study: Mapped[StudyRow] = relationship(back_populates="trials")
    metrics: Mapped[list[MetricRow]] = relationship(back_populates="trial", cascade="all, delete-orphan")


class MetricRow(Base):
    __tablename__ = "harness_metric"
    __table_args__ = (Index("ix_metric_trial_name", "trial_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("harness_trial.id"), nullable=False)
    epoch: Mapped[float] = mapped_column(Float, nullable=False)
    step: Mapped[int] = mapped_column(Integer, nullable=False)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    value: Mapped[float | None] = mapped_column(Float)

    trial: Mapped[TrialRow] = relationship(back_populates="metrics")


class BenchRow(Provenance, Base):
    """One kernel case of one ``harness bench`` run."""

    __tablename__ = "harness_bench"
    __table_args__ = (Index("ix_bench_run", "run_id"), Index("ix_bench_saved", "saved_as"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64), nullable=False)
    saved_as: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    kernel: Mapped[str] = mapped_column(String(100), nullable=False)
    impl: Mapped[str] = mapped_column(String(50), nullable=False)
    case: Mapped[str] = mapped_column(String(200), nullable=False)
    params: Mapped[dict] = mapped_column(JSON, nullable=False)
    device: Mapped[str] = mapped_column(String(50), nullable=False)
    dtype: Mapped[str] = mapped_column(String(20), nullable=False)
    direction: Mapped[str] = mapped_column(String(30), nullable=False)
    median_s: Mapped[float] = mapped_column(Float, nullable=False)
    iqr_s: Mapped[float | None] = mapped_column(Float)
    min_s: Mapped[float | None] = mapped_column(Float)
    rounds: Mapped[int | None] = mapped_column(Integer)
    peak_mem_bytes: Mapped[float | None] = mapped_column(Float)
    ratio_to_reference: Mapped[float | None] = mapped_column(Float)


class EvaluationRow(Provenance, Base):
    """One evaluation of a finished trial's saved encoder (``harness evaluate``): the protocol it
    ran with, typed where it is a headline number, the result, and where it ran. Unique per trial
    and task (``task_hash``: SHA-256 of the canonical protocol, ``protocol_spec.Task.key``), so an
    evaluation is computed once; a failed one is a row with ``status`` failed and the reason."""

    __tablename__ = "harness_evaluation"
    __table_args__ = (
        UniqueConstraint("trial_id", "task_hash", name="uq_evaluation_trial_task"),
        Index("ix_evaluation_trial", "trial_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("harness_trial.id"), nullable=False)
    task_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    task: Mapped[dict] = mapped_column(JSON, nullable=False)  # the whole protocol, settings included
    protocol: Mapped[str] = mapped_column(String(30), nullable=False)  # knn, linear, finetune, ...
    dataset: Mapped[str] = mapped_column(String(100), nullable=False)  # the data it was evaluated on
    transfer: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    fraction: Mapped[float | None] = mapped_column(Float)  # of the labeled training split
    shots: Mapped[int | None] = mapped_column(Integer)  # labeled images per class (few-shot)
    label_seed: Mapped[int | None] = mapped_column(Integer)  # draws the labeled images
    epochs: Mapped[int | None] = mapped_column(Integer)
    lr: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(20), nullable=False)  # complete or failed
    reason: Mapped[str | None] = mapped_column(Text)
    top1: Mapped[float | None] = mapped_column(Float)
    top5: Mapped[float | None] = mapped_column(Float)
    spread: Mapped[float | None] = mapped_column(Float)  # sample std over draws (few-shot)
    n_train: Mapped[int | None] = mapped_column(Integer)  # labeled images used
    n_test: Mapped[int | None] = mapped_column(Integer)
    details: Mapped[dict | None] = mapped_column(JSON)  # adaptation, per-draw values, embedding points
    seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class SlurmJobRow(Base):
    """One Slurm job that ``harness run --launcher slurm`` submitted for a study (a task of a job
    array: ``job_id`` is Slurm's ``ARRAYID_TASK``). Its state is asked of Slurm when shown (it
    changes without the harness); the row says which jobs belong to the study and where their
    logs are, for ``harness status`` and ``harness cancel``."""

    __tablename__ = "harness_slurm_job"
    __table_args__ = (Index("ix_slurm_job_study", "study_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("harness_study.id"), nullable=False)
    job_id: Mapped[str] = mapped_column(String(64), nullable=False)
    folder: Mapped[str] = mapped_column(Text, nullable=False)  # submitit's folder: logs, pickles
    submitted_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    submitted_by: Mapped[str | None] = mapped_column(String(200))  # host of `harness run`


class SchemaVersionRow(Base):
    """One row per schema version the database went through (harness/db/schema.py); the largest
    is its version. Wave-1 databases have no such table: they are version 1."""

    __tablename__ = "harness_schema_version"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    summary: Mapped[str] = mapped_column(Text, nullable=False)
    applied_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
