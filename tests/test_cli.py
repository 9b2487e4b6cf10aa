"""The ``harness`` command: help, errors without tracebacks, and run/status/export end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from harness import cli
from harness.db import SUMMARY_METRICS, utcnow
from harness.spec import TrialConfig, load_study
from harness.study import RunOptions, run_study

REPO = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ("run", "status", "report", "bench", "export")

STUDY = """\
study: cli-tiny
description: a tiny study for the command line tests
dataset: synthetic
fixed:
  train_size: 64
  test_size: 32
  batch_size: 32
  epochs: 1
  proj_hidden_dim: 32
  proj_dim: 16
  linear_epochs: 2
  knn_k: 5
grid:
  method: [simclr, random_init]
  lr: [0.001, 0.002]
seeds: [0]
"""


def harness(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )


@dataclass
class FakeRecord:
    status: str
    reason: str | None
    summary: dict[str, float | None]
    curves: list[tuple[float, int, str, float]]
    provenance: dict[str, Any]
    started_at: datetime
    ended_at: datetime


def fake_trainer(
    config: TrialConfig, *, on_eval: Any = None, progress: bool | None = None, **_: Any
) -> FakeRecord:
    summary: dict[str, float | None] = dict.fromkeys(SUMMARY_METRICS)
    if config.lr > 0.0015:
        return FakeRecord("failed", "diverged at step 7", summary, [], {}, utcnow(), utcnow())
    summary.update(knn_top1=0.7 if config.method == "simclr" else 0.4, linear_top1=0.75)
    return FakeRecord("complete", None, summary, [(1.0, 2, "loss", 1.0)], {}, utcnow(), utcnow())


def test_cli__help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"    {name}" in out, name


@pytest.mark.parametrize("name", ["run", "status", "export"])
def test_cli__subcommand_help_describes_it(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([name, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: harness {name}" in out and "--db" in out


@pytest.mark.parametrize("name", ["report", "bench"])
def test_cli__delegated_help_or_not_available(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = cli.main([name, "--help"])
    except SystemExit as exited:
        code = exited.code
    captured = capsys.readouterr()
    if code == 0:
        assert f"usage: harness {name}" in captured.out
    else:
        assert code == 2 and "not available" in captured.err


def test_cli__missing_delegate_says_not_available_yet(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(cli._DELEGATED, "bench", ("harness.no_such_package.cli", "help", "description"))
    assert cli.main(["bench"]) == 2
    assert "not available yet" in capsys.readouterr().err


def test_cli__broken_delegate_does_not_break_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "harness_broken_cli.py").write_text("raise RuntimeError('half-written module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli._DELEGATED, "report", ("harness_broken_cli", "help", "description"))
    assert cli.main(["report", "x"]) == 2
    err = capsys.readouterr().err
    assert "not available" in err and "half-written module" in err
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0


def test_cli__delegates_arguments_to_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    module = types.ModuleType("harness_fake_bench_cli")

    def add_arguments(parser: Any) -> None:
        parser.add_argument("--kernels")
        parser.add_argument("--save")

    def main(args: Any) -> int:
        seen.update(vars(args))
        return 3

    module.add_arguments = add_arguments  # type: ignore[attr-defined]
    module.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "harness_fake_bench_cli", module)
    monkeypatch.setitem(cli._DELEGATED, "bench", ("harness_fake_bench_cli", "help", "description"))
    assert cli.main(["bench", "--kernels", "nt_xent", "--save", "base"]) == 3
    assert seen == {"kernels": "nt_xent", "save": "base"}


def test_cli__bad_arguments_are_argparse_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (
        ["run", "x.yaml", "--workers", "0"],
        ["run", "x.yaml", "--device", "gpu"],
        ["export", "s", "--format", "xls"],
        ["nope"],
    ):
        with pytest.raises(SystemExit) as exited:
            cli.main(args)
        assert exited.value.code == 2
    assert "expected" in capsys.readouterr().err


def test_cli__malformed_study_exits_2_with_located_messages_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(STUDY.replace("lr: [0.001, 0.002]", "lr: [0.001, -2]").replace("knn_k: 5", "knn_kk: 5"))
    result = harness("run", str(bad), "--db", "h.db", cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert f"{bad}: grid.lr[1]: found -2" in result.stderr
    assert "fixed.knn_kk: unknown knob (did you mean 'knn_k'?)" in result.stderr
    assert not (tmp_path / "h.db").exists()


def test_cli__a_device_this_machine_lacks_exits_2_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Checked once up front: not one stored failure per trial that a plain rerun would then skip.
    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    assert cli.main(["run", str(path), "--db", str(tmp_path / "h.db"), "--device", "cuda:99"]) == 2
    err = capsys.readouterr().err
    assert "--device: 'cuda:99' was asked for" in err and "nothing was run or written" in err
    path.write_text(STUDY.replace("knn_k: 5", "knn_k: 5\n  device: cuda:99"))
    assert cli.main(["run", str(path), "--db", str(tmp_path / "h.db")]) == 2
    assert f"{path}: fixed.device: 'cuda:99'" in capsys.readouterr().err
    assert not (tmp_path / "h.db").exists()


def test_cli__dry_run_prints_the_trials_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    assert cli.main(["run", str(path), "--db", str(tmp_path / "h.db"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "= 3 trial(s)" in out  # random_init ignores lr: one trial
    assert "method=simclr lr=0.001 seed=0  [new]" in out
    assert not (tmp_path / "h.db").exists()


def test_cli__dry_run_refuses_what_the_run_would_refuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.db import Database
    from harness.spec import load_study
    from harness.study import sync_study

    grid = tmp_path / "grid.yaml"
    grid.write_text(STUDY)
    sync_study(Database(tmp_path / "h.db"), load_study(grid))
    search = tmp_path / "search.yaml"
    search.write_text(STUDY.split("grid:")[0] + "search:\n  n_trials: 2\n  space:\n    lr: {low: 0.001, high: 0.01}\n")
    assert cli.main(["run", str(search), "--db", str(tmp_path / "h.db"), "--dry-run"]) == 2
    assert "is in the database as a grid; the file makes it a search" in capsys.readouterr().err


def test_cli__dry_run_marks_what_the_database_has(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    run_study(
        load_study(path), RunOptions(db=str(tmp_path / "h.db")), run_trial=fake_trainer, echo=lambda _: None
    )
    assert cli.main(["run", str(path), "--db", str(tmp_path / "h.db"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lr=0.001 seed=0  [complete]" in out and "[failed]" in out


def test_cli__status_shows_counts_best_trials_and_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    run_study(
        load_study(path), RunOptions(db=str(tmp_path / "h.db")), run_trial=fake_trainer, echo=lambda _: None
    )
    assert cli.main(["status", "cli-tiny", "--db", str(tmp_path / "h.db")]) == 0
    out = capsys.readouterr().out
    assert "3 trial(s): 2 complete, 1 failed" in out
    assert "best by knn_top1 (maximize)" in out
    best = out.index("method=simclr lr=0.001")
    assert best < out.index("method=random_init")
    assert "method=simclr lr=0.002 seed=0: diverged at step 7" in out
    # Accuracies in percent, as in the reports (the database keeps fractions).
    assert "knn_top1 70.0%  linear_top1 75.0%  final_loss -" in out
    assert cli.main(["status", "--db", str(tmp_path / "h.db")]) == 0
    assert "cli-tiny (grid" in capsys.readouterr().out


def test_cli__status_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Like `harness report`: a missing database or an unknown study is a usage error (2).
    assert cli.main(["status", "--db", str(tmp_path / "none.db")]) == 2
    assert "no database" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    run_study(
        load_study(path), RunOptions(db=str(tmp_path / "h.db")), run_trial=fake_trainer, echo=lambda _: None
    )
    assert cli.main(["status", "other", "--db", str(tmp_path / "h.db")]) == 2
    assert "no study named 'other'" in capsys.readouterr().err
    assert cli.main(["export", "other", "--db", str(tmp_path / "h.db")]) == 2


def test_cli__unusable_database_is_a_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_text("not a database\n" * 100)
    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    assert cli.main(["status", "--db", str(garbage)]) == 1
    assert cli.main(["export", "cli-tiny", "--db", str(garbage)]) == 1
    assert cli.main(["run", str(path), "--db", str(garbage)]) == 1
    err = capsys.readouterr().err
    assert err.count("garbage.db: not a readable database (file is not a database)") == 3


def test_cli__status_imports_neither_torch_nor_optuna(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    run_study(
        load_study(path), RunOptions(db=str(tmp_path / "h.db")), run_trial=fake_trainer, echo=lambda _: None
    )
    code = (
        "import sys; from harness.cli import main; "
        f"assert main(['status', '--db', {str(tmp_path / 'h.db')!r}]) == 0; "
        "sys.exit(bool({'torch', 'optuna'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_cli__export_writes_csv_and_parquet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    run_study(
        load_study(path), RunOptions(db=str(tmp_path / "h.db")), run_trial=fake_trainer, echo=lambda _: None
    )
    monkeypatch.chdir(tmp_path)
    assert cli.main(["export", "cli-tiny", "--db", "h.db"]) == 0
    frame = pd.read_csv(tmp_path / "results" / "cli-tiny.csv")
    assert len(frame) == 3 and {"method", "lr", "knn_top1", "status", "reason"} <= set(frame.columns)
    assert (
        cli.main(["export", "cli-tiny", "--db", "h.db", "--format", "parquet", "--out", "out/t.parquet"]) == 0
    )
    parquet = pd.read_parquet(tmp_path / "out" / "t.parquet")
    assert sorted(parquet["status"]) == ["complete", "complete", "failed"]
    assert "wrote 3 trial(s)" in capsys.readouterr().out
    # Parquet bytes under a .csv name would fool the next reader.
    assert cli.main(["export", "cli-tiny", "--db", "h.db", "--format", "parquet", "--out", "t.csv"]) == 2
    assert "expected --format csv or another file name" in capsys.readouterr().err
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.slow
def test_cli__run_with_two_workers_then_status_and_export(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(STUDY)
    result = harness("run", "s.yaml", "--workers", "2", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "started 2 workers" in result.stdout
    assert "[w0]" in result.stdout and "[w1]" in result.stdout
    assert "3 complete" in result.stdout
    assert (tmp_path / "results" / "harness.db").exists()  # the default database
    status = harness("status", "cli-tiny", cwd=tmp_path, timeout=60)
    assert status.returncode == 0 and "3 trial(s): 3 complete" in status.stdout
    export = harness("export", "cli-tiny", "--format", "parquet", cwd=tmp_path, timeout=60)
    assert export.returncode == 0, export.stderr
    frame = pd.read_parquet(tmp_path / "results" / "cli-tiny.parquet")
    assert len(frame) == 3 and frame["knn_top1"].notna().all()
    assert set(frame["method"]) == {"simclr", "random_init"}
    again = harness("run", "s.yaml", "--no-progress", cwd=tmp_path)
    assert again.returncode == 0 and "this run: 0 trial(s)" in again.stdout


def test_cli__python_dash_m_harness_works() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "harness", "--help"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "export" in result.stdout


def test_cli__output_cut_short_by_head_is_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    values = ", ".join(str(round(0.0001 * i, 5)) for i in range(1, 4001))
    path.write_text(STUDY.replace("lr: [0.001, 0.002]", f"lr: [{values}]"))
    command = f"{sys.executable} -m harness run {path} --db {tmp_path / 'h.db'} --dry-run | head -n 1"
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.stdout.startswith("study cli-tiny (grid)")
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_cli__version_names_the_package_version_and_commit(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    from harness.provenance import git_state

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"harness {version('harness')}")
    commit, _ = git_state()
    if commit:  # a git checkout: the commit is named
        assert f"(git {commit[:12]}" in printed
