"""The schema version and its migrations, against a database the wave-1 harness wrote.

tests/fixtures/wave1/harness.db (see its README) is only ever opened as a copy.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text

from harness import cli
from harness.db import (
    SCHEMA_VERSION,
    Base,
    Database,
    Migration,
    NewerSchema,
    NotHarnessDatabase,
    UpgradeNeeded,
    open_existing,
    resolve_url,
    schema,
)
from harness.db.schema import declaration_problems, required_columns

FIXTURE = Path(__file__).parent / "fixtures" / "wave1"
STUDY = "quickstart"


@pytest.fixture
def wave1(tmp_path: Path) -> Path:
    """A copy of the database the wave-1 harness wrote."""
    copy = tmp_path / "wave1.db"
    shutil.copyfile(FIXTURE / "harness.db", copy)
    return copy


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dump(path: Path, tables: tuple[str, ...]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of ``tables`` in the columns wave 1 wrote (an upgrade adds columns), in a stable
    order: what an upgrade must keep."""
    with sqlite3.connect(f"file:{FIXTURE / 'harness.db'}?mode=ro", uri=True) as pristine:
        columns = {t: [f'"{row[1]}"' for row in pristine.execute(f"PRAGMA table_info({t})")] for t in tables}
    with sqlite3.connect(path) as connection:
        return {
            t: sorted(map(repr, connection.execute(f"SELECT {', '.join(columns[t])} FROM {t}").fetchall()))
            for t in tables
        }


KEPT = ("harness_study", "harness_trial", "harness_metric", "harness_bench", "trials", "trial_values", "studies")


def test_migrations__declarations_are_consistent() -> None:
    assert declaration_problems() == []
    assert len(schema.MIGRATIONS) == SCHEMA_VERSION


def test_migrations__a_bad_declaration_is_named() -> None:
    bad = (
        schema.MIGRATIONS[0],
        Migration(3, "skips 2", add_columns={"harness_trial": ("no_such_column", "config")}),
    )
    problems = declaration_problems(bad)
    assert "migration #2 is version 3, expected 2" in problems
    assert any("harness_trial.no_such_column, which models.py lacks" in p for p in problems)
    assert any("harness_trial.config, which must be nullable" in p for p in problems)


def test_required_columns__version_1_is_the_models_without_the_version_table(wave1: Path) -> None:
    at_1 = required_columns(1)
    assert set(at_1) == {"harness_study", "harness_trial", "harness_metric", "harness_bench"}
    # What wave 1 really wrote: the models' trial columns less those later migrations add.
    written = {c["name"] for c in inspect(create_engine(f"sqlite:///{wave1}")).get_columns("harness_trial")}
    assert at_1["harness_trial"] == written
    assert written < {c.name for c in Base.metadata.tables["harness_trial"].columns}


def test_wave1_fixture__read_only_commands_ask_for_the_upgrade_and_write_nothing(
    wave1: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = digest(wave1)
    with pytest.raises(UpgradeNeeded, match="schema version 1; this harness uses version"):
        open_existing(wave1)
    assert cli.main(["status", "--db", str(wave1)]) == 1
    assert cli.main(["export", STUDY, "--db", str(wave1), "--out", str(wave1.parent / "x.csv")]) == 1
    assert cli.main(["report", STUDY, "--db", str(wave1), "--out", str(wave1.parent / "r")]) == 1
    err = capsys.readouterr().err
    assert err.count(f"harness db upgrade --db {wave1}") == 3
    assert digest(wave1) == before
    assert not (wave1.parent / "x.csv").exists() and not (wave1.parent / "r").exists()


def test_wave1_fixture__db_upgrade_keeps_every_row_then_reads_as_current(
    wave1: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = dump(wave1, KEPT)
    assert cli.main(["db", "upgrade", "--db", str(wave1), "--dry-run"]) == 0
    assert f"would apply {SCHEMA_VERSION - 1} migration(s); nothing was written" in capsys.readouterr().out
    assert dump(wave1, KEPT) == before and "harness_schema_version" not in _tables(wave1)
    assert cli.main(["db", "upgrade", "--db", str(wave1)]) == 0
    assert f"upgraded the database from schema version 1 to {SCHEMA_VERSION}" in capsys.readouterr().out
    assert dump(wave1, KEPT) == before
    assert open_existing(wave1).state.version == SCHEMA_VERSION
    assert cli.main(["db", "upgrade", "--db", str(wave1)]) == 0
    assert "nothing to upgrade" in capsys.readouterr().out
    assert cli.main(["db", "version", "--db", str(wave1)]) == 0
    assert f"schema version {SCHEMA_VERSION} (this harness: {SCHEMA_VERSION})" in capsys.readouterr().out


def test_wave1_fixture__run_upgrades_then_resumes_with_zero_reruns_and_reports_rebuild(
    wave1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness.reports.render import build_report
    from harness.spec import load_study
    from harness.study import RunOptions, run_study, status_lines

    ran: list[Any] = []

    def must_not_train(config: Any, **_: Any) -> Any:
        ran.append(config)
        raise AssertionError("a finished trial of the wave-1 database was rerun")

    before = dump(wave1, KEPT)
    for study_file in ("quickstart.yaml", "search-tiny.yaml"):
        result = run_study(
            load_study(FIXTURE / study_file), RunOptions(db=str(wave1)), run_trial=must_not_train, echo=print
        )
        assert result.exit_code == 0 and result.tally.ran == 0
    out, err = capsys.readouterr()
    assert ran == []
    assert "quickstart (grid): 3 trial(s), 3 with results" in out
    assert f"upgraded the database from schema version 1 to {SCHEMA_VERSION}" in err
    assert dump(wave1, KEPT) == before
    db = open_existing(wave1)
    assert any("3 complete" in line for line in status_lines(db, STUDY))
    out_dir = build_report(db, STUDY, tmp_path / "report")
    markdown = (out_dir / "report.md").read_text()
    assert "simclr" in markdown and "byol" in markdown and "random_init" in markdown


def test_wave1_fixture__evaluate_adds_to_it_so_it_upgrades_it(wave1: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["evaluate", STUDY, "--db", str(wave1)]) == 2  # the quickstart has no evaluate: section
    assert "has no evaluate: section" in capsys.readouterr().err
    assert open_existing(wave1).state.version == SCHEMA_VERSION


def test_wave1_fixture__processes_upgrading_at_once_apply_each_migration_once(wave1: Path) -> None:
    start = time.time() + 2.0
    code = (
        f"import time\nwhile time.time() < {start}: pass\n"
        f"from harness.db import Database\nDatabase({str(wave1)!r})"
    )
    processes = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(4)]
    upgraded = 0
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()
        upgraded += b"upgraded the database" in err
    assert upgraded == 1
    with sqlite3.connect(wave1) as connection:
        versions = [v for (v,) in connection.execute("SELECT version FROM harness_schema_version")]
    assert versions == list(range(2, SCHEMA_VERSION + 1))


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as connection:
        return {n for (n,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_database__a_newer_schema_is_refused_by_every_command_and_left_alone(
    wave1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Database(wave1).dispose()
    with sqlite3.connect(wave1) as connection:
        connection.execute(
            "INSERT INTO harness_schema_version (version, summary, applied_at) VALUES (?, 'future', '2030-01-01')",
            (SCHEMA_VERSION + 5,),
        )
    before = digest(wave1)
    with pytest.raises(NewerSchema, match=f"schema version {SCHEMA_VERSION + 5}, written by a newer harness"):
        Database(wave1)
    study = tmp_path / "s.yaml"
    shutil.copyfile(FIXTURE / "quickstart.yaml", study)
    commands = (
        ["run", str(study)],
        ["status"],
        ["export", STUDY, "--out", str(tmp_path / "x.csv")],
        ["report", STUDY, "--out", str(tmp_path / "r")],
        ["db", "upgrade"],
        ["evaluate", STUDY],
    )
    for command in commands:
        assert cli.main([*command, "--db", str(wave1)]) == 1, command
    err = capsys.readouterr().err
    assert err.count("written by a newer harness") == len(commands)
    assert digest(wave1) == before


FOREIGN = (
    "CREATE TABLE harness_trial (id INTEGER PRIMARY KEY, name TEXT, score REAL)",
    "INSERT INTO harness_trial (name, score) VALUES ('theirs', 1.5)",
)


def test_database__another_programs_harness_tables_are_refused_without_touching_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as connection:
        for statement in FOREIGN:
            connection.execute(statement)
    connection.close()
    before = digest(path)
    study = tmp_path / "s.yaml"
    shutil.copyfile(FIXTURE / "quickstart.yaml", study)
    for command in (
        ["run", str(study)],
        ["status"],
        ["db", "upgrade"],
        ["report", STUDY, "--out", str(tmp_path / "r")],
        ["evaluate", STUDY],
    ):
        assert cli.main([*command, "--db", str(path)]) == 2, command
    err = capsys.readouterr().err
    assert "its harness_* tables are not the harness's" in err and "harness_trial lacks" in err
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml", "theirs.db"]


def test_database__another_programs_tables_on_postgresql_are_refused_untouched(postgres_url: str) -> None:
    engine = create_engine(resolve_url(postgres_url))
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE harness_trial (id SERIAL PRIMARY KEY, name TEXT, score REAL)"))
        connection.execute(text("INSERT INTO harness_trial (name, score) VALUES ('theirs', 1.5)"))
    with pytest.raises(NotHarnessDatabase, match="harness_trial lacks"):
        Database(postgres_url)
    assert inspect(engine).get_table_names() == ["harness_trial"]
    engine.dispose()


def _wave1_shape(url: str) -> None:
    """The tables exactly as wave 1 created them: today's models at version 1, no version table."""
    engine = create_engine(resolve_url(url))
    tables = [Base.metadata.tables[name] for name in required_columns(1)]
    Base.metadata.create_all(engine, tables=tables)
    with engine.begin() as connection:
        connection.execute(
            Base.metadata.tables["harness_study"].insert().values(name="s", kind="grid", file_text="x", file_hash="h")
        )
    engine.dispose()


def test_database__an_unversioned_database_is_upgraded_in_place_on_both_backends(database_url: str) -> None:
    _wave1_shape(database_url)
    db = Database(database_url, say=lambda _: None)
    assert [m.version for m in db.upgraded] == list(range(2, SCHEMA_VERSION + 1))
    again = open_existing(database_url)
    assert again.state.version == SCHEMA_VERSION
    assert again.run(lambda s: s.execute(text("SELECT name FROM harness_study")).scalars().all()) == ["s"]


def test_database__processes_upgrading_one_postgresql_database_at_once(postgres_url: str) -> None:
    _wave1_shape(postgres_url)
    start = time.time() + 2.0
    code = (
        f"import time\nwhile time.time() < {start}: pass\n"
        f"from harness.db import Database\nDatabase({postgres_url!r})"
    )
    processes = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(4)]
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()
    engine = create_engine(resolve_url(postgres_url))
    with engine.connect() as connection:
        versions = connection.execute(text("SELECT version FROM harness_schema_version ORDER BY version")).scalars().all()
    engine.dispose()
    assert versions == list(range(2, SCHEMA_VERSION + 1))


@pytest.fixture
def one_more_migration(monkeypatch: pytest.MonkeyPatch) -> list[Migration]:
    """A migration appended the way a developer adds one: a column of the models (here
    ``harness_trial.reason``, as if it were new) and a ``run`` step that fills it."""

    def fill(operations: Any) -> None:
        operations.execute("UPDATE harness_trial SET reason = 'filled by migration' WHERE status = 'complete'")

    added = [
        Migration(
            SCHEMA_VERSION + 1, "test: a reason for every trial", add_columns={"harness_trial": ("reason",)}, run=fill
        )
    ]
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS + tuple(added))
    monkeypatch.setattr(schema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    return added


def test_migration__an_added_column_migration_upgrades_an_older_database(
    wave1: Path, one_more_migration: list[Migration]
) -> None:
    with sqlite3.connect(wave1) as connection:
        connection.execute("ALTER TABLE harness_trial DROP COLUMN reason")  # the database predates it
    before = dump(wave1, ("harness_metric", "harness_bench", "trials"))
    db = Database(wave1, say=lambda _: None)
    assert [m.version for m in db.upgraded] == list(range(2, SCHEMA_VERSION + 2))
    with sqlite3.connect(wave1) as connection:
        reasons = {r for (r,) in connection.execute("SELECT reason FROM harness_trial")}
        versions = [v for (v,) in connection.execute("SELECT version FROM harness_schema_version")]
    assert reasons == {"filled by migration"}
    assert versions == list(range(2, SCHEMA_VERSION + 2))
    assert dump(wave1, ("harness_metric", "harness_bench", "trials")) == before


def test_migration__a_failing_migration_rolls_back_whole(
    wave1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(operations: Any) -> None:
        raise RuntimeError("migration bug")

    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, Migration(SCHEMA_VERSION + 1, "broken", run=broken)))
    monkeypatch.setattr(schema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    before = dump(wave1, KEPT)
    with pytest.raises(RuntimeError, match="migration bug"):
        Database(wave1)
    assert "harness_schema_version" not in _tables(wave1), "migration 2 was rolled back with the rest"
    assert dump(wave1, KEPT) == before


def test_database__a_fresh_database_is_created_at_the_current_version(database_url: str) -> None:
    Database(database_url)
    state = open_existing(database_url).state
    assert state.version == SCHEMA_VERSION
    assert [(v, s) for v, s, _ in state.history] == [(SCHEMA_VERSION, "created at this version")]
