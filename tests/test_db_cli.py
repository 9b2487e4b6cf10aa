"""What the commands say about databases and output paths they cannot use (issue 13): one line
naming the input and what was expected, exit 2 (usage) or 1 (environment), nothing written."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from harness import cli
from harness.db import Database, open_existing

FIXTURE = Path(__file__).parent / "fixtures" / "wave1"
STUDY = "quickstart"


@pytest.fixture
def current(tmp_path: Path) -> Path:
    """A copy of the wave-1 database, upgraded to the current schema."""
    path = tmp_path / "data" / "h.db"
    path.parent.mkdir()
    shutil.copyfile(FIXTURE / "harness.db", path)
    Database(path, say=lambda _: None).dispose()
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


READERS = (["status", STUDY], ["export", STUDY], ["report", STUDY])


def test_readers__exit_codes_agree_for_each_database_problem(
    tmp_path: Path, current: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(8192))
    empty = tmp_path / "empty.db"
    empty.touch()
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE unrelated (x INTEGER)")
    connection.close()
    cases = {
        str(tmp_path / "absent.db"): (2, "no database at"),
        "sqlite://": (2, "an in-memory database is empty in every new process"),
        str(empty): (2, "holds no harness tables"),
        str(other): (2, "holds no harness tables"),
        str(garbage): (1, "not a readable database (file is not a database)"),
    }
    out = tmp_path / "out"
    for db, (code, message) in cases.items():
        before = digest(Path(db)) if Path(db).exists() else None
        for command in READERS:
            extra = ["--out", str(out / command[0])] if command[0] != "status" else []
            assert cli.main([*command, "--db", db, *extra]) == code, (command, db)
            line = one_line(capsys.readouterr().err)
            assert message in line and line.startswith(f"harness {command[0]}"), line
        if before is not None:
            assert digest(Path(db)) == before, f"{db} was changed"
    assert not out.exists()
    assert empty.stat().st_size == 0 and not (tmp_path / "absent.db").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty.db", "garbage.db", "other.db"]


def test_readers__a_corrupted_database_is_one_line_and_exit_1(
    tmp_path: Path, current: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = 4096
    data = bytearray(current.read_bytes())
    assert sqlite3.connect(current).execute("PRAGMA page_size").fetchone()[0] == page
    # The schema (page 1) stays readable; every table's pages are overwritten.
    data[page:] = os.urandom(len(data) - page)
    current.write_bytes(bytes(data))
    for command in READERS:
        extra = ["--out", str(tmp_path / "out" / command[0])] if command[0] != "status" else []
        assert cli.main([*command, "--db", str(current), *extra]) == 1, command
        line = one_line(capsys.readouterr().err)
        assert "malformed" in line or "not a database" in line, line
    assert not (tmp_path / "out").exists()


def test_status__a_zero_byte_file_stays_zero_bytes_and_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    assert cli.main(["status", "--db", str(empty)]) == 2
    assert "holds no harness tables" in one_line(capsys.readouterr().err)
    assert empty.stat().st_size == 0 and [p.name for p in tmp_path.iterdir()] == ["empty.db"]


def test_run__an_in_memory_database_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "s.yaml"
    shutil.copyfile(FIXTURE / "quickstart.yaml", study)
    for url in ("sqlite://", "sqlite:///:memory:"):
        assert cli.main(["run", str(study), "--db", url]) == 2
        line = one_line(capsys.readouterr().err)
        assert f"--db {url}: an in-memory SQLite database is gone when `harness run` exits" in line
    # A dry run keeps nothing anyway: it is allowed.
    assert cli.main(["run", str(study), "--db", "sqlite://", "--dry-run"]) == 0


@pytest.mark.parametrize("command", ["export", "report"])
def test_outputs__unusable_paths_are_refused_before_reading_and_write_nothing(
    command: str, tmp_path: Path, current: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    a_folder = tmp_path / "a-folder"
    a_folder.mkdir()
    long_name = "x" * 300
    if command == "export":
        cases = {
            str(a_folder): "is a folder; expected a file name",
            str(a_file / "out.csv"): "is a file, so the file cannot be made under it",
            str(tmp_path / f"{long_name}.csv"): "bytes; this file system allows 255",
        }
    else:
        cases = {
            str(a_file): "is a file; expected a folder",
            str(a_file / "report"): "is a file, so the folder cannot be made under it",
            str(tmp_path / long_name): "bytes; this file system allows 255",
        }
    for out, message in cases.items():
        assert cli.main([command, STUDY, "--db", str(current), "--out", out]) == 2, out
        line = one_line(capsys.readouterr().err)
        assert message in line and "--out" in line, line
    # A study name too long for a file name, with the default output path.
    monkeypatch.chdir(tmp_path)
    with sqlite3.connect(current) as connection:
        connection.execute("UPDATE harness_study SET name = ? WHERE name = ?", (long_name, STUDY))
    connection.close()
    assert cli.main([command, long_name, "--db", str(current)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "the study name is the" in line and "give --out" in line and "bytes; this file system allows 255" in line
    assert a_file.read_text() == "mine" and list(a_folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder", "data"]


@pytest.mark.parametrize("command", ["export", "report"])
def test_outputs__a_read_only_target_is_exit_1(
    command: str, tmp_path: Path, current: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() == 0:
        # Root writes through permission bits: make the check see what a user sees.
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == folder else real(p, mode, **k))
    folder.chmod(0o555)
    try:
        assert cli.main([command, STUDY, "--db", str(current), "--out", str(folder / "out")]) == 1
        assert f"{folder} is not writable" in one_line(capsys.readouterr().err)
    finally:
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_outputs__export_and_report_write_where_asked(
    tmp_path: Path, current: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["export", STUDY, "--db", str(current), "--out", str(tmp_path / "x" / "q.csv")]) == 0
    assert len((tmp_path / "x" / "q.csv").read_text().splitlines()) == 4  # a header and 3 trials
    assert cli.main(["report", STUDY, "--db", str(current), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").exists()
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["q.csv"], "no temporary file is left"


def test_bench__an_unknown_device_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "b.db"
    assert cli.main(["bench", "--device", "tpu", "--quick", "--db", str(db)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line == (
        "harness bench: error: --device tpu: 'tpu' is not a device name (expected auto, cpu, cuda or "
        "cuda:N); nothing was run or written"
    )
    assert not db.exists()


def test_sqlite__a_read_only_folder_names_wal_mode(
    tmp_path: Path, current: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = current.parent
    for leftover in folder.glob("h.db-*"):
        leftover.unlink()
    if os.geteuid() == 0:
        # Root opens anything; SQLite then fails as it does for a user only if it really cannot
        # create NAME-shm: a folder in its place makes that happen for root too.
        (folder / "h.db-shm").mkdir()
        (folder / "h.db-wal").mkdir()
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == folder else real(p, mode, **k))
    folder.chmod(0o555)
    try:
        codes = [cli.main(["status", "--db", str(current)]), cli.main(["run", str(FIXTURE / "quickstart.yaml"), "--db", str(current)])]
        err = capsys.readouterr().err
    finally:
        folder.chmod(0o755)
    assert codes == [1, 1], err
    assert err.count("WAL mode, which writes h.db-wal and h.db-shm beside the file") == 2, err
    assert err.count(f"the folder {folder} is not writable") == 2


def test_open_existing__reads_without_changing_the_journal_mode(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    Database(path).dispose()
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA journal_mode=DELETE")
    connection.close()
    before = digest(path)
    db = open_existing(path)
    db.run(lambda s: s.connection().exec_driver_sql("SELECT count(*) FROM harness_trial").scalar())
    db.dispose()
    assert digest(path) == before
