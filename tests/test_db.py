from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select
from sqlalchemy.exc import IntegrityError, OperationalError

from harness.db import Database, StudyRow, TrialRow, resolve_url


def test_resolve_url__paths_become_sqlite_urls_and_urls_pass_through(tmp_path: Path) -> None:
    assert resolve_url(tmp_path / "a.db") == f"sqlite:///{tmp_path / 'a.db'}"
    # A bare postgresql:// gets psycopg 3 (the postgres extra) whatever SQLAlchemy's default is.
    assert resolve_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert resolve_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert resolve_url(None) == "sqlite:///results/harness.db"


def test_database__sqlite_is_opened_in_wal_mode_with_our_tables(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    Database(path)
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"harness_study", "harness_trial", "harness_metric", "harness_bench"} <= tables


def test_database__processes_creating_a_fresh_database_at_once_all_succeed(database_url: str) -> None:
    # They start together: each waits for the same moment, then opens the database.
    start = time.time() + 2.0
    code = (
        f"import time\nwhile time.time() < {start}: pass\n"
        f"from harness.db import Database\nDatabase({database_url!r})"
    )
    processes = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(6)]
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()
    tables = set(inspect(create_engine(resolve_url(database_url))).get_table_names())
    assert {"harness_study", "harness_trial", "harness_metric", "harness_bench"} <= tables


def _study(session: object) -> StudyRow:
    study = StudyRow(name="s", kind="grid", file_text="study: s", file_hash="0" * 64)
    session.add(study)  # type: ignore[attr-defined]
    session.flush()  # type: ignore[attr-defined]
    return study


def test_trial__unique_on_study_config_hash_and_seed(database_url: str) -> None:
    db = Database(database_url)

    def add_twice(session: object) -> None:
        study = _study(session)
        for _ in range(2):
            session.add(TrialRow(study_id=study.id, config={}, config_hash="h", seed=0))  # type: ignore[attr-defined]
        session.flush()  # type: ignore[attr-defined]

    with pytest.raises(IntegrityError):
        db.run(add_twice)
    assert db.run(lambda s: s.scalars(select(StudyRow)).all()) == []  # rolled back whole


def test_trial__nan_is_stored_as_a_result(database_url: str) -> None:
    db = Database(database_url)

    def add(session: object) -> None:
        study = _study(session)
        session.add(TrialRow(study_id=study.id, config={}, config_hash="h", seed=0, final_loss=math.nan))  # type: ignore[attr-defined]

    db.run(add)
    value = db.run(lambda s: s.scalars(select(TrialRow.final_loss)).one())
    # SQLite has no NaN: it stores NULL; the trial's failed status and reason carry the divergence.
    if db.is_sqlite:
        assert value is None
    else:
        assert math.isnan(value)


def test_run__retries_a_locked_database_then_succeeds(tmp_path: Path) -> None:
    db = Database(tmp_path / "h.db")
    calls = []

    def flaky(_session: object) -> int:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("UPDATE", {}, sqlite3.OperationalError("database is locked"))
        return 7

    assert db.run(flaky) == 7 and len(calls) == 3


def test_run__other_errors_are_not_retried(tmp_path: Path) -> None:
    db = Database(tmp_path / "h.db")
    calls = []

    def broken(_session: object) -> None:
        calls.append(1)
        raise OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: x"))

    with pytest.raises(OperationalError):
        db.run(broken)
    assert len(calls) == 1


def test_trials_frame__a_missing_sqlite_file_is_an_error_not_a_new_database(tmp_path: Path) -> None:
    from harness.results import trials_frame

    missing = tmp_path / "typo.db"
    with pytest.raises(FileNotFoundError, match="no database at"):
        trials_frame(missing, "g1")
    assert not missing.exists()
