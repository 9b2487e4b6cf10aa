"""harness evaluate: results stored with their protocol, once per trial and task; trials without
weights named with the reason; failed evaluations recorded and retried; the section's errors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from harness.backbones import small_cnn
from harness.db import Database
from harness.results import evaluations_frame, trials_frame
from harness.spec import parse_study
from harness.study import evaluate

sys.path.insert(0, str(Path(__file__).parent))
import report_fixtures as fx

STUDY_TEXT = """\
study: eval-digits
dataset: digits
fixed: {backbone: small_cnn, epochs: 1, test_size: 100, knn_k: 20, linear_epochs: 5}
grid:
  method: [simclr, random_init]
seeds: [0, 1]
"""
EVALUATE_TEXT = """\
evaluate:
  linear: {fractions: [0.05], epochs: 3}
  finetune: {fractions: [0.05], epochs: 1}
  few_shot: {shots: [1], draws: 2}
  transfer: [{dataset: mnist, protocols: [knn]}]
"""


def _loader(missing: set[int]) -> Any:
    def load(db: Database, trial_id: int, device: str) -> torch.nn.Module:
        if trial_id in missing:
            raise FileNotFoundError(f"no encoder weights for trial {trial_id} (trained before checkpoints)")
        torch.manual_seed(trial_id)
        return small_cnn(1, 28)[0]

    return load


@pytest.fixture()
def database(tmp_path: Path) -> Database:
    db = Database(tmp_path / "harness.db")
    study_id = fx._add_study(db, STUDY_TEXT, fx.T0)
    for index, config in enumerate(parse_study(STUDY_TEXT).trials()):
        fx._add_trial(db, study_id, config, index, summary=fx._summary(config, config.seed), curves=False)
    return db


@pytest.mark.slow
def test_run_evaluations__stores_each_protocol_once_names_trials_without_weights(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HARNESS_DATA_ROOT", str(tmp_path / "no-data"))  # mnist is not on this machine
    plan = evaluate.plan_from_text(EVALUATE_TEXT, "test")
    assert plan is not None
    trials = trials_frame(database, "eval-digits")
    no_weights = int(trials["trial_id"].iloc[-1])
    lines: list[str] = []
    report = evaluate.run_evaluations(database, "eval-digits", plan, device="cpu", loader=_loader({no_weights}), echo=lines.append)
    assert report.unavailable == [(no_weights, f"FileNotFoundError: no encoder weights for trial {no_weights} (trained before checkpoints)")]
    assert any(line.endswith("cannot be evaluated: " + report.unavailable[0][1]) for line in lines)
    assert len(report.evaluated) == 3 * 3 and len(report.failed) == 3  # mnist transfer fails for each trial
    frame = evaluations_frame(database, "eval-digits")
    assert set(frame["trial_id"]) == set(trials["trial_id"]) - {no_weights}
    fine = frame[frame["protocol"] == "finetune"]
    assert set(fine["fraction"]) == {0.05} and set(fine["epochs"]) == {1} and set(fine["lr"]) == {0.05}
    assert fine["task"].iloc[0]["settings"]["backbone_lr_scale"] == 0.1
    scratch = fine.merge(trials[["trial_id", "method"]], on="trial_id")
    assert {m: d["backbone_lr_scale_used"] for m, d in zip(scratch["method"], scratch["details"])} == {"simclr": 0.1, "random_init": 1.0}
    assert set(fine["task"].map(lambda t: t["settings"]["head_init"])) == {"probe"}
    assert {m: d["head_init_used"] for m, d in zip(scratch["method"], scratch["details"])} == {"simclr": "probe", "random_init": "zero"}
    failed = frame[frame["status"] == "failed"]
    assert set(failed["dataset"]) == {"mnist"} and all(failed["transfer"])
    assert all("DatasetNotFoundError" in reason for reason in failed["reason"])
    assert frame.loc[frame["status"] == "complete", "top1"].between(0, 1).all()

    # A second run computes nothing stored, retries the failed ones (still failing: replaced, not added).
    again = evaluate.run_evaluations(database, "eval-digits", plan, device="cpu", loader=_loader({no_weights}), echo=lambda _: None)
    assert again.evaluated == [] and len(again.failed) == 3 and again.already == 9
    assert len(evaluations_frame(database, "eval-digits")) == len(frame)


def test_main__errors_name_the_problem(database: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*argv: str) -> int:
        parser = argparse.ArgumentParser()
        evaluate.add_arguments(parser)
        return evaluate.main(parser.parse_args([*argv, "--db", str(tmp_path / "harness.db")]))

    assert run("eval-digits") == 2
    assert "the stored study file has no evaluate: section" in capsys.readouterr().err
    assert run("nope") == 2
    assert "no study named 'nope' in the database; known studies: eval-digits" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("evaluate:\n  finetune: {lr: -1}\n")
    assert run("eval-digits", "--file", str(bad)) == 2
    assert f"{bad}: evaluate.finetune.lr: expected a number > 0" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(EVALUATE_TEXT)
    assert run("eval-digits", "--file", str(good), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "(simclr, seed 0): linear 5% labels, finetune 5% labels, few_shot_knn 1-shot, knn on mnist" in out


def test_main__a_study_from_before_weights_names_each_trial_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The wave-1 database (tests/fixtures/wave1): upgraded in place as `harness run` would, every
    complete trial named with why it cannot be evaluated, exit status 1, no evaluation row."""
    import shutil

    db_path = tmp_path / "harness.db"
    shutil.copy(Path(__file__).parent / "fixtures" / "wave1" / "harness.db", db_path)
    plan_file = tmp_path / "evaluate.yaml"
    plan_file.write_text(EVALUATE_TEXT)
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    code = evaluate.main(parser.parse_args(["quickstart", "--db", str(db_path), "--file", str(plan_file), "--device", "cpu"]))
    captured = capsys.readouterr()
    assert code == 1
    complete = trials_frame(str(db_path), "quickstart")
    complete = complete[complete["status"] == "complete"]
    assert len(complete) == 3
    for trial_id in complete["trial_id"]:
        assert f"trial {trial_id} cannot be evaluated: " in captured.err
    assert "0 evaluation(s) stored, 0 failed, 0 already stored, 3 trial(s) without usable weights" in captured.out
    assert evaluations_frame(str(db_path), "quickstart").empty
