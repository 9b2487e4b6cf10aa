"""The study-level progress line of harness run: counts, elapsed, ETA from measured trial times,
best so far; and what a trial prints (its configuration once, accuracies in percent)."""

from __future__ import annotations

import sys
from pathlib import Path

from harness.spec import load_study
from harness.study import RunOptions, run_study
from harness.study.progress import Snapshot, StudyProgress, duration_text, progress_line
from harness.study.worker import describe_outcome

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import STUDY, fake_trainer


def test_duration_text__seconds_minutes_hours() -> None:
    assert duration_text(42.4) == "42 s"
    assert duration_text(185) == "3 min 05 s"
    assert duration_text(2 * 3600 + 7 * 60 + 10) == "2 h 07 min"


def test_progress_line__counts_eta_and_best() -> None:
    shot = Snapshot(
        counts={"complete": 2, "failed": 1, "pending": 9},
        total=12,
        durations=(20.0, 30.0, 25.0),
        best=(4, "knn_top1", 0.715),
        elapsed=80.0,
        workers=1,
    )
    assert progress_line(shot) == (
        "progress: 3/12 done (2 complete, 1 failed), 0 running, 9 pending; elapsed 1 min 20 s, "
        "ETA ~3 min 45 s (25 s per trial, measured over 3); best knn_top1 71.5% (trial #4)"
    )
    # Two workers halve the rounds left (9 trials -> 5 rounds).
    two = progress_line(Snapshot(**{**shot.__dict__, "workers": 2}))
    assert "ETA ~2 min 05 s (25 s per trial, measured over 3, 2 workers)" in two
    # A trial running elsewhere (another harness run process) counts as a worker too.
    elsewhere = progress_line(Snapshot(**{**shot.__dict__, "counts": {"complete": 3, "running": 1, "pending": 8}}))
    assert "1 running, 8 pending" in elsewhere and "ETA ~2 min 05 s" in elsewhere


def test_progress_line__before_any_measurement_and_at_the_end() -> None:
    start = Snapshot(counts={"pending": 4}, total=4, durations=(), best=None, elapsed=3.0, workers=1)
    assert progress_line(start) == "progress: 0/4 done, 0 running, 4 pending; elapsed 3 s, ETA after the first trial"
    # A search: rows appear as it samples; the total is n_trials.
    end = Snapshot(counts={"complete": 5, "pruned": 1}, total=6, durations=(1.0,), best=(2, "final_loss", 1.25), elapsed=61, workers=1)
    assert progress_line(end) == (
        "progress: 6/6 done (5 complete, 1 pruned), 0 running, 0 pending; elapsed 1 min 01 s, nothing left; "
        "best final_loss 1.25 (trial #2)"
    )


def test_describe_outcome__accuracies_in_percent() -> None:
    text = describe_outcome("complete", {"summary": {"knn_top1": 0.7, "linear_top1": 0.755, "final_loss": 4.5}}, 3.0)
    assert text == "complete in 3.0 s: knn_top1 70.0%, linear_top1 75.5%, final_loss 4.5"


def test_run_study__prints_each_configuration_once_and_a_progress_line_per_trial(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    lines: list[str] = []
    run_study(
        load_study(path),
        RunOptions(db=str(tmp_path / "h.db")),
        run_trial=fake_trainer,
        echo=lines.append,
        events=(StudyProgress(),),
    )
    progress = [line for line in lines if line.startswith("progress: ")]
    assert len(progress) == 3
    assert progress[0].startswith("progress: 1/3 done (1 complete), 0 running, 2 pending; elapsed ")
    assert "ETA ~" in progress[0] and "per trial, measured over 1)" in progress[0]
    assert progress[-1].startswith("progress: 3/3 done (2 complete, 1 failed), 0 running, 0 pending")
    assert progress[-1].endswith("nothing left; best knn_top1 70.0% (trial #1)")
    # The configuration label appears on the "running" line only.
    labelled = [line for line in lines if "method=simclr lr=0.001" in line]
    assert len(labelled) == 1 and "running on" in labelled[0]
    assert any(line.startswith("trial #1: complete in ") and "knn_top1 70.0%" in line for line in lines)


def test_run_trial__epoch_bar_shows_loss_and_learning_rate(capsys: object) -> None:
    import re

    from harness import train
    from harness.spec import resolve

    config = resolve(
        {"dataset": "synthetic", "train_size": 64, "test_size": 32, "batch_size": 16, "epochs": 1,
         "knn_k": 5, "linear_epochs": 1, "log_every": 1, "proj_hidden_dim": 32, "proj_dim": 16}
    )
    record = train.run_trial(config, progress=True)
    assert record.status == "complete", record.reason
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    shown = re.findall(r"loss ([0-9.e+-]+), lr ([0-9.e+-]+)", err)
    assert shown, err[-500:]
    # The bar shows a loss the trial really logged (tqdm redraws at most every 0.1 s, so the last
    # value drawn may be a few steps before the last one).
    logged = {float(f"{v:.4g}") for _, _, n, v in record.curves if n == "loss"}
    assert float(shown[-1][0]) in logged, (shown[-1], sorted(logged))
