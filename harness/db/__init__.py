"""The results database: models, schema versions and the only place that opens sessions (no torch)."""

from __future__ import annotations

from harness.db.engine import (
    DEFAULT_DB_PATH,
    Database,
    in_memory,
    open_existing,
    require_persistent,
    resolve_url,
    sqlite_file,
)
from harness.db.errors import (
    DatabaseProblem,
    NewerSchema,
    NoHarnessTables,
    NotHarnessDatabase,
    NotPersistent,
    UnusableDatabase,
    UpgradeNeeded,
    describe,
)
from harness.db.models import (
    PROVENANCE_FIELDS,
    SUMMARY_METRICS,
    TRIAL_STATUSES,
    Base,
    BenchRow,
    EvaluationRow,
    MetricRow,
    SchemaVersionRow,
    SlurmJobRow,
    StudyRow,
    TrialRow,
    utcnow,
)
from harness.db.schema import MIGRATIONS, SCHEMA_VERSION, Migration

__all__ = [
    "DEFAULT_DB_PATH",
    "MIGRATIONS",
    "PROVENANCE_FIELDS",
    "SCHEMA_VERSION",
    "SUMMARY_METRICS",
    "TRIAL_STATUSES",
    "Base",
    "BenchRow",
    "Database",
    "DatabaseProblem",
    "EvaluationRow",
    "MetricRow",
    "Migration",
    "NewerSchema",
    "NoHarnessTables",
    "NotHarnessDatabase",
    "NotPersistent",
    "SchemaVersionRow",
    "SlurmJobRow",
    "StudyRow",
    "TrialRow",
    "UnusableDatabase",
    "UpgradeNeeded",
    "describe",
    "in_memory",
    "open_existing",
    "require_persistent",
    "resolve_url",
    "sqlite_file",
    "utcnow",
]
