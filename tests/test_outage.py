"""A database outage at the end of a trial loses nothing (issue 13, item 3).

The fault is real: each test starts its own throwaway PostgreSQL server (initdb into tmp_path, as
scripts/setup.sh does) and stops it with ``pg_ctl stop`` while a trial runs, so the shared test
server of the other tests is never touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import OperationalError

from harness.db import SUMMARY_METRICS, Database, MetricRow, TrialRow, resolve_url, utcnow
from harness.spec import TrialConfig, load_study
from harness.study import RunOptions, run_study, store
from harness.study.store import ResultNotWritten, _unreachable
from harness.train import TrialRecord

STUDY = """\
study: outage
description: one trial whose database goes away while it trains
dataset: synthetic
fixed:
  train_size: 64
  test_size: 32
  batch_size: 32
  epochs: 1
grid:
  method: [simclr]
seeds: [0]
"""


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class Server:
    """A PostgreSQL server of this test alone."""

    bin: Path
    data: Path
    port: int
    sudo: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"postgresql://harness@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.sudo, str(self.bin / "pg_ctl"), "-D", str(self.data / "data"), *args],
            check=True, capture_output=True, timeout=120,
        )

    def start(self) -> None:
        options = f"-k {self.data} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.ctl("-l", str(self.data / "server.log"), "-w", "start", "-o", options)

    def stop(self) -> None:
        self.ctl("-w", "stop", "-m", "fast")


@pytest.fixture
def server() -> Iterator[Server]:
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (scripts/setup.sh test installs them)")
    # Not under tmp_path: pytest's folders are private to their owner, and the server runs as postgres.
    data = Path(tempfile.mkdtemp(prefix="harness-pg-outage."))
    sudo: tuple[str, ...] = ()
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(data, "postgres")
        sudo = ("runuser", "-u", "postgres", "--")
    subprocess.run(
        [*sudo, str(pg_bin / "initdb"), "-D", str(data / "data"), "-A", "trust", "-U", "harness"],
        check=True, capture_output=True, timeout=300,
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = Server(pg_bin, data, port, sudo)
    running.start()
    try:
        yield running
    finally:
        subprocess.run(
            [*sudo, str(pg_bin / "pg_ctl"), "-D", str(data / "data"), "stop", "-m", "immediate"],
            capture_output=True, timeout=120, check=False,
        )
        shutil.rmtree(data, ignore_errors=True)


def trainer_that_stops(server: Server, restart_after: float | None) -> Any:
    """Stops the server at the end of training (restarting it after ``restart_after`` seconds),
    then returns a result with recognisable values."""
    calls: list[TrialConfig] = []

    def train(config: TrialConfig, *, on_eval: Any = None, progress: bool | None = None, **_: Any) -> TrialRecord:
        calls.append(config)
        server.stop()
        if restart_after is not None:
            threading.Timer(restart_after, server.start).start()
        summary: dict[str, float | None] = dict.fromkeys(SUMMARY_METRICS)
        summary.update(knn_top1=0.625, linear_top1=0.75, final_loss=float("inf"))
        return TrialRecord("complete", None, summary, [(1.0, 4, "loss", 2.5)], {}, utcnow(), utcnow())

    train.calls = calls  # type: ignore[attr-defined]
    return train


def _rows(url: str) -> list[Any]:
    engine = create_engine(resolve_url(url))
    with engine.connect() as connection:
        rows = connection.execute(select(TrialRow.status, TrialRow.knn_top1, TrialRow.final_loss, TrialRow.id)).all()
        points = connection.execute(select(MetricRow.name, MetricRow.value)).all()
    engine.dispose()
    return [rows, points]


@pytest.mark.slow
def test_outage__a_server_back_within_the_patience_gets_the_result(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    study_file = tmp_path / "s.yaml"
    study_file.write_text(STUDY)
    said: list[str] = []
    train = trainer_that_stops(server, restart_after=4.0)
    result = run_study(load_study(study_file), RunOptions(db=server.url), run_trial=train, echo=said.append)
    assert result.exit_code == 0 and result.tally.complete == 1
    rows, points = _rows(server.url)
    assert [(r.status, r.knn_top1, r.final_loss) for r in rows] == [("complete", 0.625, float("inf"))]
    assert points == [("loss", 2.5)]
    waiting = next(line for line in said if "the database does not answer" in line)
    assert "its result is kept in results/unwritten/" in waiting and "retrying for up to 600 s" in waiting
    assert any("the database answered again after" in line for line in said)
    assert not any(Path("results/unwritten").rglob("*.json")), "the kept file is removed once written"


@pytest.mark.slow
def test_outage__past_the_patience_the_result_is_kept_and_the_next_run_writes_it(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(store, "RESULT_PATIENCE_S", 3.0)
    study_file = tmp_path / "s.yaml"
    study_file.write_text(STUDY)
    train = trainer_that_stops(server, restart_after=None)
    with pytest.raises(ResultNotWritten) as raised:
        run_study(load_study(study_file), RunOptions(db=server.url), run_trial=train, echo=lambda _: None)
    kept = sorted(Path("results/unwritten").rglob("trial-*.json"))
    assert len(kept) == 1
    assert f"the result is kept in {kept[0]}" in str(raised.value)
    assert "the next `harness run` on this database writes it (nothing is rerun)" in str(raised.value)
    server.start()
    said: list[str] = []
    again = trainer_that_stops(server, restart_after=None)
    result = run_study(load_study(study_file), RunOptions(db=server.url), run_trial=again, echo=said.append)
    assert again.calls == [] and result.exit_code == 0, "the kept result was written, nothing rerun"
    assert any(f"wrote the result kept in {kept[0]}" in line for line in said)
    rows, points = _rows(server.url)
    assert [(r.status, r.knn_top1) for r in rows] == [("complete", 0.625)] and points == [("loss", 2.5)]
    assert not Path("results/unwritten").exists() or not any(Path("results/unwritten").rglob("*.json"))


@pytest.mark.slow
def test_outage__the_cli_gives_up_with_one_line_exit_1(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness import cli
    from harness.study import runner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(store, "RESULT_PATIENCE_S", 2.0)
    monkeypatch.setattr(runner, "default_trial_runner", lambda: trainer_that_stops(server, restart_after=None))
    study_file = tmp_path / "s.yaml"
    study_file.write_text(STUDY)
    assert cli.main(["run", str(study_file), "--db", server.url]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("harness run: trial #1: the database did not answer for 2 s"), err


def test_kept_result__round_trips_through_its_file(tmp_path: Path) -> None:
    claim = store.Claim(7, "host:1", 2, {"method": "simclr", "lr": 0.001}, 0, "pending", None, 3)
    values = {"status": "complete", "knn_top1": float("nan"), "final_loss": float("-inf"), "ended_at": utcnow()}
    kept = store.KeptResult(claim, values, [{"epoch": 1.0, "step": 2, "name": "loss", "value": 0.5}])
    back = store.KeptResult.from_json(kept.to_json())
    assert back.claim == claim and back.points == kept.points
    assert back.values["ended_at"] == values["ended_at"] and back.values["final_loss"] == float("-inf")
    assert back.values["knn_top1"] != back.values["knn_top1"]  # NaN


def test_unreachable__only_a_database_that_does_not_answer_is_waited_for() -> None:
    def sqlite_error(message: str) -> OperationalError:
        return OperationalError("SELECT 1", {}, sqlite3.OperationalError(message))

    assert _unreachable(sqlite_error("disk I/O error"))
    assert _unreachable(sqlite_error("unable to open database file"))
    assert not _unreachable(sqlite_error("no such table: harness_trial"))
    assert not _unreachable(ValueError("not a database error"))


def test_kept_results_dir__beside_a_sqlite_file(tmp_path: Path) -> None:
    db = Database(tmp_path / "h.db")
    assert store.kept_results_dir(db) == tmp_path / "h.db.unwritten"
    assert store.write_kept_results(db) == []


def test_write_kept_results__a_result_whose_trial_was_taken_over_is_dropped(tmp_path: Path) -> None:
    study_file = tmp_path / "s.yaml"
    study_file.write_text(STUDY)
    db = Database(tmp_path / "h.db")
    report = store.sync_study(db, load_study(study_file))
    stale = datetime(2000, 1, 1)
    old = store.claim_next(db, report.study_id, "dead:1", stale_before=stale)
    assert old is not None
    with db.engine.begin() as connection:  # its heartbeat stopped long ago; another worker takes over
        connection.execute(text("UPDATE harness_trial SET heartbeat = '2000-01-01'"))
    new = store.claim_next(db, report.study_id, "alive:2", stale_before=utcnow())
    assert new is not None and new.attempts == old.attempts + 1
    folder = store.kept_results_dir(db)
    folder.mkdir()
    kept = store.KeptResult(old, {"status": "complete", "knn_top1": 0.9}, [])
    (folder / "trial-1-attempt-1.json").write_text(kept.to_json())
    lines = store.write_kept_results(db)
    assert lines == [
        f"trial #{old.row_id}: another worker took the trial over meanwhile; dropped the result kept in "
        f"{folder / 'trial-1-attempt-1.json'}"
    ]
    assert db.run(lambda s: s.scalar(select(TrialRow.status))) == "running" and not folder.exists()
