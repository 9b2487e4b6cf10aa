"""The results database: models and the only place that opens sessions (no torch import)."""

from __future__ import annotations

from harness.db.engine import DEFAULT_DB_PATH, Database, open_existing, resolve_url, sqlite_file
from harness.db.models import (
    PROVENANCE_FIELDS,
    SUMMARY_METRICS,
    TRIAL_STATUSES,
    Base,
    BenchRow,
    EvaluationRow,
    MetricRow,
    StudyRow,
    TrialRow,
    utcnow,
)

__all__ = [
    "DEFAULT_DB_PATH",
    "PROVENANCE_FIELDS",
    "SUMMARY_METRICS",
    "TRIAL_STATUSES",
    "Base",
    "BenchRow",
    "Database",
    "EvaluationRow",
    "MetricRow",
    "StudyRow",
    "TrialRow",
    "open_existing",
    "resolve_url",
    "sqlite_file",
    "utcnow",
]
