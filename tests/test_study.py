"""Running studies: expansion into pending rows, atomic claims, heartbeats and takeover, results
written once, interrupts, changed files, and the acceptance runs (concurrent runners, kill -9)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import OperationalError, ProgrammingError

from harness.db import SUMMARY_METRICS, Database, DatabaseProblem, MetricRow, StudyRow, TrialRow, utcnow
from harness.reports import build_report
from harness.results import trials_frame
from harness.spec import SpecError, TrialConfig, load_study
from harness.study import (
    RunOptions,
    StudyConflict,
    WorkerEvents,
    claim_next,
    finish,
    heartbeat,
    release,
    run_study,
    sync_study,
)

REPO = Path(__file__).resolve().parent.parent

# A real trial of a few seconds on the CPU (generated data, no files).
TINY = {
    "dataset": "synthetic",
    "train_size": 64,
    "test_size": 32,
    "batch_size": 32,
    "proj_hidden_dim": 32,
    "proj_dim": 16,
    "linear_epochs": 2,
    "knn_k": 5,
}


def study_file(
    tmp_path: Path,
    grid: dict[str, list[Any]],
    *,
    name: str = "tiny",
    fixed: dict[str, Any] | None = None,
    seeds: str = "[0]",
    file: str = "study.yaml",
) -> Path:
    fixed_items = {**TINY, "epochs": 1, "eval_every": 1, **(fixed or {})}
    lines = [f"study: {name}", "description: a tiny test study", "fixed:"]
    lines += [f"  {k}: {v}" for k, v in fixed_items.items()]
    lines.append("grid:")
    lines += [f"  {k}: [{', '.join(str(v) for v in values)}]" for k, values in grid.items()]
    lines.append(f"seeds: {seeds}")
    path = tmp_path / file
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class FakeRecord:
    status: str
    reason: str | None
    summary: dict[str, float | None]
    curves: list[tuple[float, int, str, float]]
    provenance: dict[str, Any]
    started_at: datetime
    ended_at: datetime


@dataclass
class FakeTrainer:
    """Stands in for harness.train.run_trial: instant, deterministic, and scriptable."""

    fail_on: Callable[[TrialConfig], str | None] = lambda config: None
    interrupt_on_call: int | None = None
    raise_on_call: int | None = None
    calls: list[TrialConfig] = field(default_factory=list)

    def __call__(
        self, config: TrialConfig, *, on_eval: Any = None, progress: bool | None = None, **_: Any
    ) -> FakeRecord:
        self.calls.append(config)
        if self.interrupt_on_call == len(self.calls):
            raise KeyboardInterrupt
        if self.raise_on_call == len(self.calls):
            raise ValueError("a bug in the trainer")
        started = utcnow()
        reason = self.fail_on(config)
        summary: dict[str, float | None] = dict.fromkeys(SUMMARY_METRICS)
        summary.update(knn_top1=0.5 + config.lr, final_loss=1.0 if reason is None else float("nan"))
        curves = [(0.5, 1, "loss", 2.0), (1.0, 2, "loss", 1.0), (1.0, 2, "knn_top1", 0.5)]
        return FakeRecord(
            status="failed" if reason else "complete",
            reason=reason,
            summary=summary,
            curves=curves,
            provenance={"git_commit": "abc123", "host": "test"},
            started_at=started,
            ended_at=utcnow(),
        )


def quiet(_: str) -> None:
    return None


def rows(db: Database, study: str = "tiny") -> list[TrialRow]:
    return db.run(
        lambda s: list(
            s.scalars(select(TrialRow).join(StudyRow).where(StudyRow.name == study).order_by(TrialRow.id))
        )
    )


def metric_count(db: Database, trial_id: int) -> int:
    return db.run(lambda s: s.scalar(select(func.count(MetricRow.id)).where(MetricRow.trial_id == trial_id)))


# ----------------------------------------------------------------------------------------------
# Registering a study


def test_sync_study__inserts_one_pending_row_per_trial(tmp_path: Path) -> None:
    study = load_study(
        study_file(tmp_path, {"method": ["simclr", "byol"], "lr": [0.001, 0.002]}, seeds="[0, 1]")
    )
    db = Database(tmp_path / "h.db")
    report = sync_study(db, study)
    assert report.created and len(report.added) == 8 and report.kept == 0
    stored = rows(db)
    assert len(stored) == 8 and {r.status for r in stored} == {"pending"}
    assert {(r.config_hash, r.seed) for r in stored} == {(c.config_hash, c.seed) for c in study.trials()}
    assert all(TrialConfig(**r.config) in study.trials() for r in stored)
    study_row = db.run(lambda s: s.scalar(select(StudyRow)))
    assert (
        study_row.file_text == study.text
        and study_row.file_hash == study.text_hash
        and study_row.kind == "grid"
    )

    again = sync_study(db, study)
    assert not again.created and not again.file_changed and again.added == () and again.kept == 8
    assert len(rows(db)) == 8


def test_sync_study__deduplicates_trials_a_method_ignores(tmp_path: Path) -> None:
    study = load_study(study_file(tmp_path, {"method": ["simclr", "byol"], "temperature": [0.1, 0.2, 0.5]}))
    db = Database(tmp_path / "h.db")
    sync_study(db, study)
    assert sorted(r.config["method"] for r in rows(db)) == ["byol", "simclr", "simclr", "simclr"]


def test_sync_study__changed_file_adds_points_keeps_results_and_reports_the_rest(tmp_path: Path) -> None:
    db = Database(tmp_path / "h.db")
    first = load_study(study_file(tmp_path, {"lr": [0.001, 0.002, 0.003]}))
    trainer = FakeTrainer()
    run_study(first, RunOptions(db=str(tmp_path / "h.db")), run_trial=trainer, echo=quiet)
    assert len(trainer.calls) == 3
    before = {r.config["lr"]: (r.id, r.knn_top1, r.ended_at) for r in rows(db)}

    changed = load_study(study_file(tmp_path, {"lr": [0.002, 0.003, 0.004, 0.005]}))
    report = sync_study(db, changed)
    assert report.file_changed and not report.created
    assert report.added == ("lr=0.004 seed=0", "lr=0.005 seed=0")
    assert report.kept == 2 and report.kept_finished == 2
    assert report.gone == ("lr=0.001 seed=0",)

    lines: list[str] = []
    trainer = FakeTrainer()
    run_study(changed, RunOptions(db=str(tmp_path / "h.db")), run_trial=trainer, echo=lines.append)
    # Neither the old results nor the point dropped from the file run again.
    assert sorted(c.lr for c in trainer.calls) == [0.004, 0.005]
    after = {r.config["lr"]: (r.id, r.knn_top1, r.ended_at) for r in rows(db)}
    for lr in (0.001, 0.002, 0.003):
        assert after[lr] == before[lr]
    assert {r.status for r in rows(db)} == {"complete"}
    assert db.run(lambda s: s.scalar(select(StudyRow.file_text))) == changed.text


def test_sync_study__changed_file_says_what_changed(tmp_path: Path) -> None:
    first = load_study(study_file(tmp_path, {"lr": [0.001, 0.002]}))
    run_study(first, RunOptions(db=str(tmp_path / "h.db"), max_trials=1), run_trial=FakeTrainer(), echo=quiet)
    changed = load_study(study_file(tmp_path, {"lr": [0.002, 0.003]}))
    lines: list[str] = []
    run_study(changed, RunOptions(db=str(tmp_path / "h.db")), run_trial=FakeTrainer(), echo=lines.append)
    text = "\n".join(lines)
    assert "the file changed since the last run" in text
    assert "+ lr=0.003 seed=0" in text
    assert "no longer in the file" in text and "- lr=0.001 seed=0" in text


def test_sync_study__a_changed_fixed_knob_is_named_in_the_added_and_gone_lines(tmp_path: Path) -> None:
    db = Database(tmp_path / "h.db")
    sync_study(db, load_study(study_file(tmp_path, {"lr": [0.001]}, fixed={"epochs": 1})))
    changed = load_study(study_file(tmp_path, {"lr": [0.001]}, fixed={"epochs": 2}))
    lines: list[str] = []
    run_study(changed, RunOptions(db=str(tmp_path / "h.db")), run_trial=FakeTrainer(), echo=lines.append)
    assert "  + lr=0.001 epochs=2 seed=0" in lines and "  - lr=0.001 epochs=1 seed=0" in lines


def test_sync_study__search_and_grid_cannot_share_a_name(tmp_path: Path) -> None:
    db = Database(tmp_path / "h.db")
    sync_study(db, load_study(study_file(tmp_path, {"lr": [0.001]})))
    search = tmp_path / "search.yaml"
    search.write_text("study: tiny\nsearch:\n  n_trials: 2\n  space:\n    lr: {low: 0.001, high: 0.01}\n")
    with pytest.raises(StudyConflict, match="rename"):
        sync_study(db, load_study(search))


# ----------------------------------------------------------------------------------------------
# Claims and heartbeats


def test_claim_next__each_trial_goes_to_exactly_one_of_many_claimers(tmp_path: Path, database_url: str) -> None:
    db = Database(database_url)
    study = load_study(study_file(tmp_path, {"lr": [0.001 * i for i in range(1, 9)]}))
    report = sync_study(db, study)
    claimed: list[int] = []
    lock = threading.Lock()
    stale = utcnow() - timedelta(hours=1)

    def claimer(index: int) -> None:
        mine = Database(database_url)
        while True:
            claim = claim_next(mine, report.study_id, f"w{index}", stale_before=stale)
            if claim is None:
                return
            with lock:
                claimed.append(claim.row_id)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(report.row_ids or ())
    assert all(r.status == "running" and r.attempts == 1 for r in rows(db))


def test_claim_next__takes_over_a_trial_whose_heartbeat_stopped(tmp_path: Path) -> None:
    db = Database(tmp_path / "h.db")
    report = sync_study(db, load_study(study_file(tmp_path, {"lr": [0.001]})))
    dead = claim_next(db, report.study_id, "dead", stale_before=utcnow())
    assert dead is not None
    # Fresh heartbeat: not taken.
    assert claim_next(db, report.study_id, "alive", stale_before=utcnow() - timedelta(seconds=60)) is None
    # Heartbeat older than the timeout: taken over, attempt 2.
    alive = claim_next(db, report.study_id, "alive", stale_before=utcnow() + timedelta(seconds=1))
    assert alive is not None and alive.row_id == dead.row_id and alive.attempts == 2
    assert alive.previous_status == "running" and alive.previous_worker == "dead"
    # The old owner can neither heartbeat, nor write a result, nor hand the trial back.
    assert not heartbeat(db, dead)
    kwargs: dict[str, Any] = {
        "status": "complete",
        "reason": None,
        "summary": {"knn_top1": 0.1},
        "curves": [(1.0, 1, "loss", 1.0)],
        "provenance": {},
        "started_at": None,
        "ended_at": None,
    }
    assert not finish(db, dead, **kwargs)
    assert not release(db, dead)
    assert heartbeat(db, alive)
    assert finish(db, alive, **{**kwargs, "summary": {"knn_top1": 0.9}})
    [row] = rows(db)
    assert row.status == "complete" and row.knn_top1 == 0.9 and row.worker == "alive"
    assert metric_count(db, row.id) == 1


def test_claim_next__never_takes_a_complete_trial(tmp_path: Path) -> None:
    db = Database(tmp_path / "h.db")
    study = load_study(study_file(tmp_path, {"lr": [0.001, 0.002]}))
    run_study(study, RunOptions(db=str(tmp_path / "h.db")), run_trial=FakeTrainer(), echo=quiet)
    report = sync_study(db, study)
    future = utcnow() + timedelta(days=1)
    assert claim_next(db, report.study_id, "w", stale_before=future, retry_failed_before=future) is None
    trainer = FakeTrainer()
    run_study(study, RunOptions(db=str(tmp_path / "h.db")), run_trial=trainer, echo=quiet)
    assert trainer.calls == []


def test_finish__writes_summary_provenance_and_curves_together(tmp_path: Path) -> None:
    db = Database(tmp_path / "h.db")
    study = load_study(study_file(tmp_path, {"lr": [0.001]}))
    run_study(study, RunOptions(db=str(tmp_path / "h.db")), run_trial=FakeTrainer(), echo=quiet)
    [row] = rows(db)
    assert row.status == "complete" and row.reason is None and row.attempts == 1
    assert row.knn_top1 == pytest.approx(0.501) and row.final_loss == 1.0
    assert row.git_commit == "abc123" and row.host == "test"
    assert row.started_at is not None and row.ended_at is not None and row.started_at <= row.ended_at
    assert metric_count(db, row.id) == 3


# ----------------------------------------------------------------------------------------------
# Running


def test_run_study__failed_trial_is_a_result_and_the_study_goes_on(tmp_path: Path) -> None:
    study = load_study(study_file(tmp_path, {"lr": [0.001, 0.002, 0.003]}))
    trainer = FakeTrainer(fail_on=lambda c: "diverged at step 3" if c.lr == 0.002 else None)
    result = run_study(study, RunOptions(db=str(tmp_path / "h.db")), run_trial=trainer, echo=quiet)
    assert result.exit_code == 0 and result.tally.failed == 1 and result.tally.complete == 2
    by_lr = {r.config["lr"]: r for r in rows(Database(tmp_path / "h.db"))}
    assert by_lr[0.002].status == "failed" and by_lr[0.002].reason == "diverged at step 3"
    assert by_lr[0.001].status == by_lr[0.003].status == "complete"


def test_run_study__real_trial_forced_to_diverge_is_failed_and_the_next_one_runs(tmp_path: Path) -> None:
    """Issue 4's acceptance with the real trainer: SGD at lr 1e30 diverges within the first steps."""
    fixed = {"optimizer": "sgd", "eval_every": 0, "train_size": 128, "epochs": 2}  # 8 steps: some after warm-up
    study = load_study(study_file(tmp_path, {"lr": [1e30, 0.001]}, fixed=fixed))
    result = run_study(study, RunOptions(db=str(tmp_path / "h.db"), progress=False), echo=quiet)
    assert result.exit_code == 0 and result.tally.failed == 1 and result.tally.complete == 1
    db = Database(tmp_path / "h.db")
    by_lr = {r.config["lr"]: r for r in rows(db)}
    diverged, healthy = by_lr[1e30], by_lr[0.001]
    assert diverged.status == "failed" and diverged.reason.startswith("diverged at step ")
    assert diverged.knn_top1 is None and diverged.git_commit is not None
    assert healthy.status == "complete" and healthy.reason is None
    assert 0.0 <= healthy.knn_top1 <= 1.0 and healthy.train_img_per_s > 0
    assert metric_count(db, healthy.id) > 0


def test_run_study__trainer_exception_is_recorded_as_failed(tmp_path: Path) -> None:
    study = load_study(study_file(tmp_path, {"lr": [0.001, 0.002]}))
    result = run_study(
        study, RunOptions(db=str(tmp_path / "h.db")), run_trial=FakeTrainer(raise_on_call=1), echo=quiet
    )
    assert result.exit_code == 0
    first, second = rows(Database(tmp_path / "h.db"))
    assert (
        first.status == "failed"
        and first.reason is not None
        and first.reason.startswith("ValueError: a bug in the trainer")
    )
    assert second.status == "complete"


def test_run_study__failed_trials_rerun_only_with_retry_failed(tmp_path: Path) -> None:
    study = load_study(study_file(tmp_path, {"lr": [0.001, 0.002]}))
    options = RunOptions(db=str(tmp_path / "h.db"))
    run_study(
        study,
        options,
        run_trial=FakeTrainer(fail_on=lambda c: "out of memory" if c.lr == 0.002 else None),
        echo=quiet,
    )
    trainer = FakeTrainer()
    run_study(study, options, run_trial=trainer, echo=quiet)
    assert trainer.calls == []
    trainer = FakeTrainer()
    run_study(study, RunOptions(db=str(tmp_path / "h.db"), retry_failed=True), run_trial=trainer, echo=quiet)
    assert [c.lr for c in trainer.calls] == [0.002]
    retried = next(r for r in rows(Database(tmp_path / "h.db")) if r.config["lr"] == 0.002)
    assert retried.status == "complete" and retried.attempts == 2 and retried.reason is None
    assert metric_count(Database(tmp_path / "h.db"), retried.id) == 3  # the failed attempt's curves replaced


def test_run_study__ctrl_c_hands_the_trial_back_and_a_rerun_finishes(tmp_path: Path) -> None:
    study = load_study(study_file(tmp_path, {"lr": [0.001, 0.002, 0.003]}))
    options = RunOptions(db=str(tmp_path / "h.db"))
    lines: list[str] = []
    result = run_study(study, options, run_trial=FakeTrainer(interrupt_on_call=2), echo=lines.append)
    assert result.exit_code == 130 and result.tally.interrupted
    statuses = [(r.status, r.reason) for r in rows(Database(tmp_path / "h.db"))]
    assert statuses == [("complete", None), ("pending", "interrupted"), ("pending", None)]
    assert any("interrupted" in line for line in lines)
    trainer = FakeTrainer()
    assert run_study(study, options, run_trial=trainer, echo=quiet).exit_code == 0
    assert [c.lr for c in trainer.calls] == [0.002, 0.003]
    assert {r.status for r in rows(Database(tmp_path / "h.db"))} == {"complete"}


@dataclass
class EventLog(WorkerEvents):
    """Records the worker loop's hooks, in order."""

    seen: list[tuple[Any, ...]] = field(default_factory=list)

    def claimed(self, ctx: Any, claim: Any) -> None:
        self.seen.append(("claimed", claim.row_id))

    def finished(self, ctx: Any, claim: Any, result: Any) -> None:
        self.seen.append(("finished", claim.row_id, None if result is None else result.status))

    def released(self, ctx: Any, claim: Any) -> None:
        self.seen.append(("released", claim.row_id))


def test_run_study__worker_events_see_each_trial_claimed_finished_or_released(tmp_path: Path) -> None:
    study = load_study(study_file(tmp_path, {"lr": [0.001, 0.002, 0.003]}))
    log = EventLog()
    trainer = FakeTrainer(interrupt_on_call=3, fail_on=lambda c: "bad lr" if c.lr == 0.002 else None)
    result = run_study(study, RunOptions(db=str(tmp_path / "h.db")), run_trial=trainer, echo=quiet, events=[log])
    assert result.exit_code == 130
    first, second, third = (r.id for r in rows(Database(tmp_path / "h.db")))
    assert log.seen == [
        ("claimed", first),
        ("finished", first, "complete"),
        ("claimed", second),
        ("finished", second, "failed"),
        ("claimed", third),
        ("released", third),
    ]


def test_run_study__max_trials_stops_early(tmp_path: Path) -> None:
    study = load_study(study_file(tmp_path, {"lr": [0.001, 0.002, 0.003]}))
    trainer = FakeTrainer()
    run_study(study, RunOptions(db=str(tmp_path / "h.db"), max_trials=2), run_trial=trainer, echo=quiet)
    assert len(trainer.calls) == 2
    assert sorted(r.status for r in rows(Database(tmp_path / "h.db"))) == ["complete", "complete", "pending"]


def test_run_study__device_override_is_not_part_of_the_configuration(tmp_path: Path) -> None:
    study = load_study(study_file(tmp_path, {"lr": [0.001]}))
    trainer = FakeTrainer()
    run_study(study, RunOptions(db=str(tmp_path / "h.db"), device="cpu"), run_trial=trainer, echo=quiet)
    assert trainer.calls[0].device == "cpu"
    [row] = rows(Database(tmp_path / "h.db"))
    assert row.config["device"] == "cpu" and row.config_hash == study.trials()[0].config_hash


@pytest.mark.slow
def test_run_study__diverging_trial_is_recorded_failed_and_the_study_continues(tmp_path: Path) -> None:
    # A real trial: SGD at an absurd learning rate makes Barlow Twins' loss non-finite.
    path = study_file(
        tmp_path, {"lr": [0.001, 1e10]}, fixed={"method": "barlow_twins", "optimizer": "sgd", "log_every": 1}
    )
    result = run_study(load_study(path), RunOptions(db=str(tmp_path / "h.db"), progress=False), echo=quiet)
    assert result.exit_code == 0
    by_lr = {r.config["lr"]: r for r in rows(Database(tmp_path / "h.db"))}
    assert by_lr[1e10].status == "failed" and by_lr[1e10].reason is not None
    assert by_lr[1e10].reason.startswith("diverged at step")
    assert by_lr[0.001].status == "complete" and by_lr[0.001].knn_top1 is not None


# ----------------------------------------------------------------------------------------------
# Acceptance: processes


def harness(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def files_digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def test_harness_run__malformed_file_leaves_the_database_byte_identical(tmp_path: Path) -> None:
    from harness.cli import main

    dbdir = tmp_path / "db"
    dbdir.mkdir()
    good = study_file(tmp_path, {"lr": [0.001, 0.002]})
    run_study(load_study(good), RunOptions(db=str(dbdir / "h.db")), run_trial=FakeTrainer(), echo=quiet)
    before = files_digest(dbdir)
    assert "h.db" in before
    bad = tmp_path / "bad.yaml"
    # Same study name, one new valid point and one invalid one: nothing at all may be written.
    bad.write_text(good.read_text().replace("lr: [0.001, 0.002]", "lr: [0.001, 0.002, 0.003, -1]"))
    with pytest.raises(SpecError):
        load_study(bad)
    assert main(["run", str(bad), "--db", str(dbdir / "h.db")]) == 2
    assert files_digest(dbdir) == before
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("study: tiny\ngrid: [\n")
    assert main(["run", str(syntax), "--db", str(dbdir / "h.db")]) == 2
    assert files_digest(dbdir) == before


def _table_contents(url: str) -> dict[str, list[tuple[Any, ...]]]:
    db = Database(url, create=False)
    names = sorted(inspect(db.engine).get_table_names())
    return db.run(
        lambda s: {name: sorted(map(tuple, s.execute(text(f'SELECT * FROM "{name}"'))), key=repr) for name in names}
    )


def test_harness_run__malformed_file_changes_nothing_in_postgresql(tmp_path: Path, postgres_url: str) -> None:
    from harness.cli import main

    good = study_file(tmp_path, {"lr": [0.001, 0.002]})
    run_study(load_study(good), RunOptions(db=postgres_url), run_trial=FakeTrainer(), echo=quiet)
    before = _table_contents(postgres_url)
    assert len(before["harness_trial"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("lr: [0.001, 0.002]", "lr: [0.001, 0.002, 0.003, -1]"))
    assert main(["run", str(bad), "--db", postgres_url]) == 2
    assert _table_contents(postgres_url) == before


@pytest.mark.slow
def test_harness_run__two_concurrent_runners_split_an_8_point_study(tmp_path: Path, database_url: str) -> None:
    path = study_file(tmp_path, {"lr": [round(0.001 * i, 4) for i in range(1, 9)]})
    runners = [harness("run", str(path), "--db", database_url, "--no-progress", cwd=tmp_path) for _ in range(2)]
    outputs = [runner.communicate(timeout=240)[0] for runner in runners]
    for runner, output in zip(runners, outputs):
        assert runner.returncode == 0, output
        assert "locked" not in output.lower(), output
    db = Database(database_url)
    stored = rows(db)
    assert len(stored) == 8
    assert all(r.status == "complete" and r.attempts == 1 for r in stored), [
        (r.status, r.attempts) for r in stored
    ]
    assert len({r.worker for r in stored}) == 2, "both runners should have taken trials"
    counts = {metric_count(db, r.id) for r in stored}
    assert len(counts) == 1 and counts.pop() > 0  # every trial's curves written once
    # What a researcher reads next works on this database too: the frame and the report.
    frame = trials_frame(database_url, study="tiny")
    assert len(frame) == 8 and sorted(frame["lr"]) == sorted(r.config["lr"] for r in stored)
    report = build_report(database_url, "tiny", tmp_path / "report")
    assert "lr=0.008" in (report / "report.md").read_text()


@pytest.mark.slow
def test_harness_run__kill_9_mid_trial_then_rerun_completes_every_trial_once(tmp_path: Path, database_url: str) -> None:
    path = study_file(tmp_path, {"lr": [0.001, 0.002, 0.003]}, fixed={"epochs": 2})
    timeout = "3"
    run = ("run", str(path), "--db", database_url, "--no-progress", "--heartbeat-timeout", timeout)
    runner = harness(*run, cwd=tmp_path)
    victim = _wait_for_running_trial(database_url, runner)
    time.sleep(0.5)  # well inside the trial (it takes seconds)
    runner.send_signal(signal.SIGKILL)
    runner.communicate(timeout=30)
    db = Database(database_url)
    status = db.run(lambda s: s.scalar(select(TrialRow.status).where(TrialRow.id == victim)))
    assert status == "running"  # left behind by the dead process

    rerun = harness(*run, cwd=tmp_path)
    output = rerun.communicate(timeout=240)[0]
    assert rerun.returncode == 0, output
    assert "taking over" in output
    stored = rows(db)
    assert all(r.status == "complete" for r in stored), output
    attempts = {r.id: r.attempts for r in stored}
    assert attempts[victim] == 2 and all(n == 1 for i, n in attempts.items() if i != victim)
    counts = {metric_count(db, r.id) for r in stored}
    assert len(counts) == 1  # the rerun trial's curves are there once, like every other trial's


def _wait_for_running_trial(url: str, runner: subprocess.Popen[str], limit: float = 120.0) -> int:
    deadline = time.monotonic() + limit
    db: Database | None = None
    while time.monotonic() < deadline:
        assert runner.poll() is None, "the runner ended before a trial started"
        try:
            # create=False: the runner creates the tables; until then there is nothing to find.
            db = db or Database(url, create=False)
            found = db.run(lambda s: s.scalar(select(TrialRow.id).where(TrialRow.status == "running").limit(1)))
        except (OperationalError, ProgrammingError, DatabaseProblem):  # no database file or tables yet
            found = None
        if found:
            return int(found)
        time.sleep(0.1)
    raise AssertionError("no trial started running in time")


def test_study_module__imports_neither_torch_nor_optuna() -> None:
    code = "import sys, harness.study, harness.cli; sys.exit(bool({'torch', 'optuna'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


def test_run_options__heartbeat_interval_is_a_fraction_of_the_timeout() -> None:
    assert RunOptions(heartbeat_timeout=3).heartbeat_interval == pytest.approx(0.5)
    assert RunOptions(heartbeat_timeout=600).heartbeat_interval == 10.0


def test_device_shown__auto_is_resolved_for_the_progress_line() -> None:
    from harness.study.worker import _device_shown

    expected = "cuda (auto)" if __import__("torch").cuda.is_available() else "cpu (auto)"
    assert _device_shown("auto") == expected
    assert _device_shown("cuda:1") == "cuda:1" and _device_shown("cpu") == "cpu"


def test_status_lines__top_is_honoured_in_the_overview_of_every_study(tmp_path: Path) -> None:
    from harness.study import status_lines

    study = load_study(study_file(tmp_path, {"lr": [0.001 * i for i in range(1, 7)]}))
    run_study(study, RunOptions(db=str(tmp_path / "h.db")), run_trial=FakeTrainer(), echo=quiet)
    db = Database(tmp_path / "h.db")

    def best(lines: list[str]) -> int:
        return sum(line.lstrip().startswith("#") for line in lines)

    assert best(status_lines(db)) == 3 and best(status_lines(db, "tiny")) == 5
    assert best(status_lines(db, top=4)) == 4 and best(status_lines(db, "tiny", top=2)) == 2


# ----------------------------------------------------------------------------------------------
# A dead owner on this machine: reclaimed at once


def _gone_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    done = subprocess.run(["true"], check=True)
    assert done.returncode == 0
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_owner_is_dead__only_for_a_provably_gone_process_on_this_host() -> None:
    import socket

    from harness.study.liveness import owner_is_dead

    host = socket.gethostname()
    now = utcnow()
    assert owner_is_dead(f"{host}:{_gone_pid()}", now)
    assert not owner_is_dead(f"another-{host}:{_gone_pid()}", now)  # other hosts keep the timeout
    assert not owner_is_dead(f"{host}:{os.getpid()}", now)
    assert not owner_is_dead("not a worker name", now)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.2)
        # The live process with that id started before the heartbeat: it may be the owner.
        assert not owner_is_dead(f"{host}:{sleeper.pid}", utcnow() + timedelta(seconds=2))
        # ... it started after the heartbeat: the id was reused, the owner is gone.
        assert owner_is_dead(f"{host}:{sleeper.pid}", now - timedelta(seconds=30))
    finally:
        sleeper.kill()
        sleeper.wait()


def test_run_study__a_dead_local_owners_trial_is_taken_over_without_waiting_for_the_timeout(
    tmp_path: Path,
) -> None:
    import socket

    study = load_study(study_file(tmp_path, {"lr": [0.001, 0.002]}))
    db = Database(tmp_path / "h.db")
    report = sync_study(db, study)
    dead = f"{socket.gethostname()}:{_gone_pid()}"
    elsewhere = "another-host:1"
    first, second = report.row_ids or ()
    for row_id, owner in ((first, dead), (second, elsewhere)):
        claim = claim_next(db, report.study_id, owner, stale_before=utcnow(), row_ids=[row_id])
        assert claim is not None  # running, heartbeat fresh
    lines: list[str] = []
    trainer = FakeTrainer()
    started = time.monotonic()
    result = run_study(
        study, RunOptions(db=str(tmp_path / "h.db"), heartbeat_timeout=600, max_trials=1),
        run_trial=trainer, echo=lines.append,
    )
    assert time.monotonic() - started < 30 and result.exit_code == 0
    assert [c.lr for c in trainer.calls] == [0.001]
    assert any(f"taking over from {dead}, whose process on this machine is gone" in line for line in lines)
    stored = {r.id: r for r in rows(db)}
    assert stored[first].status == "complete" and stored[first].attempts == 2
    assert stored[second].status == "running" and stored[second].worker == elsewhere


def test_capped_workers__at_most_one_per_core_unless_forced() -> None:
    from harness.study.runner import _cpu_cores, capped_workers

    cores = _cpu_cores()
    assert capped_workers(RunOptions(workers=cores, device="cpu")) == (cores, None)
    workers, note = capped_workers(RunOptions(workers=cores + 3, device="cpu"))
    assert workers == cores and note == (
        f"--workers {cores + 3}: this machine has {cores} CPU core(s); running {cores} worker(s) "
        f"(--force-workers runs {cores + 3})"
    )
    assert capped_workers(RunOptions(workers=cores + 3, device="cpu", force_workers=True)) == (cores + 3, None)


@pytest.mark.slow
def test_harness_run__ctrl_c_during_start_up_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    """Ctrl-C once the study is validated and registered, before its trial starts. Not at a fixed
    delay: a SIGINT landing inside ``import torch`` itself can be swallowed by torch's import
    (``python -c "import torch; ..."`` interrupted 0.6 s in ran on to exit 0 here), and the
    command imports torch right after saying "loading torch"; the imports before that are covered
    by ``harness/__main__.py``'s handler."""
    path = study_file(tmp_path, {"lr": [0.001]})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for stage in ("(grid): new",):
        runner = subprocess.Popen(
            [sys.executable, "-m", "harness", "run", str(path), "--db", str(tmp_path / f"{len(stage)}.db"), "--no-progress"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert runner.stdout is not None
        seen: list[str] = []
        for line in runner.stdout:
            seen.append(line)
            if stage in line:
                break
        os.killpg(runner.pid, signal.SIGINT)  # what Ctrl-C does: the whole process group
        output = "".join(seen) + runner.communicate(timeout=120)[0]
        # -SIGINT: an interrupt inside torch's import passes through an embedded interpreter call,
        # after which CPython ends the process by SIGINT (a shell shows 130 either way).
        assert runner.returncode in (130, -signal.SIGINT), (stage, output)
        assert "Traceback" not in output, (stage, output)
        assert "complete" not in output, (stage, output)


@pytest.mark.slow
def test_harness_run__sigint_to_the_parent_of_workers_reaches_the_workers(tmp_path: Path) -> None:
    """`kill -INT` of the parent only (a job scheduler): the workers hand their trials back."""
    path = study_file(tmp_path, {"lr": [0.001, 0.002, 0.003, 0.004]}, fixed={"epochs": 4})
    url = f"sqlite:///{tmp_path / 'h.db'}"
    runner = harness(
        "run", str(path), "--db", url, "--workers", "2", "--force-workers", "--no-progress", cwd=tmp_path
    )
    _wait_for_running_trial(url, runner)
    runner.send_signal(signal.SIGINT)
    output = runner.communicate(timeout=120)[0]
    assert runner.returncode == 130, output
    assert "Traceback" not in output, output
    stored = rows(Database(url))
    assert "running" not in {r.status for r in stored}, [(r.status, r.reason) for r in stored]
    assert any(r.status == "pending" and r.reason == "interrupted" for r in stored), output
