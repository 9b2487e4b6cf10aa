"""Acceptance of checkpoints through `harness run`: kill -9 and SIGTERM mid-trial, then rerun; the
result equals an uninterrupted run's. And the weights of a finished trial reproduce its k-NN."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from harness.db import Database, TrialRow
from harness.spec import load_study
from harness.study import RunOptions, run_study

RESULTS = (
    "final_loss",
    "knn_top1",
    "linear_top1",
    "linear_top5",
    "alignment",
    "uniformity",
    "effective_rank",
)
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
REPO = Path(__file__).resolve().parents[1]


def study_file(folder: Path, method: str) -> Path:
    extra = {"moco": {"queue_size": 64}}.get(method, {})
    text = {
        "study": f"resume-{method}",
        "dataset": "synthetic",
        "fixed": {
            "train_size": 320,
            "test_size": 40,
            "batch_size": 32,  # 10 steps per epoch
            "epochs": 4,
            "knn_k": 5,
            "linear_epochs": 3,
            "log_every": 1,
            "proj_hidden_dim": 32,
            "proj_dim": 16,
            "checkpoint_epochs": 1,
            "device": "cpu",
            **extra,
        },
        "grid": {"method": [method]},
        "seeds": [0],
    }
    path = folder / f"{method}.yaml"
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    return path


def harness(*args: str, cwd: Path) -> subprocess.Popen[str]:
    # One thread, like this process's reference run (tests/conftest.py): a float sum split over
    # another number of threads rounds differently, which is not what these tests are about.
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def only_trial(db_path: Path) -> TrialRow:
    db = Database(db_path)
    try:
        rows = db.run(lambda s: list(s.scalars(select(TrialRow))))
    finally:
        db.dispose()
    assert len(rows) == 1
    return rows[0]


def reference(tmp_path: Path, method: str) -> TrialRow:
    """The same study run without interruption, in this process."""
    folder = tmp_path / "reference"
    folder.mkdir()
    result = run_study(
        load_study(study_file(folder, method)),
        RunOptions(db=str(folder / "h.db"), progress=False),
        echo=lambda _: None,
    )
    assert result.exit_code == 0
    return only_trial(folder / "h.db")


def wait_for(path_glob: tuple[Path, str], runner: subprocess.Popen[str], limit: float = 300.0) -> Path:
    folder, pattern = path_glob
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert runner.poll() is None, "the run ended before its first checkpoint:\n" + (
            runner.stdout.read() if runner.stdout else ""
        )
        found = sorted(folder.glob(pattern)) if folder.is_dir() else []
        if found:
            return found[0]
        time.sleep(0.02)
    runner.kill()
    raise AssertionError(f"no {pattern} in {folder} in time")


def assert_same_result(reference_row: TrialRow, row: TrialRow) -> None:
    assert row.status == reference_row.status == "complete", (row.reason, reference_row.reason)
    assert {k: getattr(row, k) for k in RESULTS} == {k: getattr(reference_row, k) for k in RESULTS}
    assert row.weights_sha256 == reference_row.weights_sha256
    assert Path(row.weights_path).read_bytes() == Path(reference_row.weights_path).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["moco", "byol"])
def test_harness_run__sigkill_after_a_checkpoint_then_rerun_equals_an_uninterrupted_run(
    method: str, tmp_path: Path
) -> None:
    expected = reference(tmp_path, method)
    work = tmp_path / "killed"
    work.mkdir()
    path = study_file(work, method)
    trial_folder = work / "results" / "harness-checkpoints" / f"resume-{method}" / "trial-1"
    runner = harness("run", str(path), "--no-progress", cwd=work)
    wait_for((trial_folder, "step-*.ckpt"), runner)
    time.sleep(random.uniform(0.0, 0.3))  # at a random step after the first checkpoint
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=60)
    killed = only_trial(work / "results" / "harness.db")
    assert killed.status == "running" and not (trial_folder / "final.ckpt").exists()
    rerun = harness("run", str(path), "--no-progress", cwd=work)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output
    assert "taking over" in output and "resuming from checkpoint" in output, output
    row = only_trial(work / "results" / "harness.db")
    assert row.attempts == 2 and row.checkpoint_dir == str(trial_folder.absolute())
    assert_same_result(expected, row)


@pytest.mark.slow
def test_harness_run__sigterm_checkpoints_sets_pending_exits_143_and_the_rerun_resumes(
    tmp_path: Path,
) -> None:
    expected = reference(tmp_path, "moco")
    work = tmp_path / "stopped"
    work.mkdir()
    path = study_file(work, "moco")
    trial_folder = work / "results" / "harness-checkpoints" / "resume-moco" / "trial-1"
    runner = harness("run", str(path), "--no-progress", cwd=work)
    wait_for((trial_folder, "step-*.ckpt"), runner)
    runner.send_signal(signal.SIGTERM)
    output, _ = runner.communicate(timeout=120)
    assert runner.returncode == 143, output
    assert "interrupted; set back to pending" in output, output
    stopped = only_trial(work / "results" / "harness.db")
    assert stopped.status == "pending" and stopped.reason == "interrupted"
    newest = max(trial_folder.glob("step-*.ckpt"))
    step = int(newest.stem.split("-")[1])
    # The hand-back line names the checkpoint written as the trial stopped: the newest.
    assert f"resume from checkpoint {newest.absolute()})" in output, output
    rerun = harness("run", str(path), "--no-progress", cwd=work)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output
    assert f"resuming from checkpoint {newest.absolute()} (step {step}" in output, output
    assert_same_result(expected, only_trial(work / "results" / "harness.db"))


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_load_encoder__a_quickstart_trial_reproduces_its_knn(tmp_path: Path) -> None:
    import torch

    from harness import evaluation
    from harness.data import load_dataset
    from harness.results import load_encoder
    from harness.train import SUBSET_SEED

    db_path = tmp_path / "h.db"
    options = RunOptions(db=str(db_path), progress=False, max_trials=1)  # the first: simclr
    run_study(load_study(REPO / "studies" / "quickstart.yaml"), options, echo=lambda _: None)
    row = Database(db_path).run(
        lambda s: s.scalars(select(TrialRow).where(TrialRow.status == "complete")).one()
    )
    config = row.config
    encoder = load_encoder(db_path, row.id)
    assert not encoder.training
    train = load_dataset("fashion-mnist", "train", size=config["train_size"], seed=SUBSET_SEED)
    test = load_dataset("fashion-mnist", "test", size=config["test_size"], seed=SUBSET_SEED)
    features = [
        evaluation.extract_features(encoder, split.images, mean=split.mean, std=split.std, device="cpu")
        for split in (train, test)
    ]
    knn = evaluation.knn_top1(
        features[0],
        train.labels,
        features[1],
        test.labels,
        k=config["knn_k"],
        t=config["knn_t"],
        num_classes=train.num_classes,
    )
    assert knn == row.knn_top1
    assert torch.is_tensor(features[0]) and features[0].shape[1] == 256


# -- the study layer's side, without training ------------------------------------------------------


def test_heartbeat__carries_live_curves_and_status_shows_progress_and_disk(tmp_path: Path) -> None:
    from datetime import timedelta

    from harness.db import MetricRow, utcnow
    from harness.study import status_lines, store

    path = study_file(tmp_path, "simclr")
    study = load_study(path)
    db = Database(tmp_path / "h.db")
    report = store.sync_study(db, study)
    claim = store.claim_next(db, report.study_id, "me:1", stale_before=utcnow() - timedelta(seconds=90))
    assert claim is not None
    folder = tmp_path / "ckpt" / "trial-1"
    folder.mkdir(parents=True)
    (folder / "step-000000010.ckpt").write_bytes(b"x" * 3 * 1024 * 1024)
    assert store.set_checkpoint_dir(db, claim, str(folder))
    stale = [(0.5, 5, "loss", 9.0), (1.0, 10, "knn_top1", 0.1)]  # an earlier attempt's
    assert store.heartbeat(db, claim, points=stale)
    now = [(0.5, 5, "loss", 7.25), (1.0, 10, "loss", 6.5), (1.0, 10, "knn_top1", 0.4), (1.2, 12, "lr", 0.1)]
    assert store.heartbeat(db, claim, points=now, replace_points=True)
    stored = db.run(
        lambda s: [(m.step, m.name, m.value) for m in s.scalars(select(MetricRow).order_by(MetricRow.id))]
    )
    assert stored == [(5, "loss", 7.25), (10, "loss", 6.5), (10, "knn_top1", 0.4), (12, "lr", 0.1)]
    text = "\n".join(status_lines(db, "resume-simclr"))
    assert "checkpoints and weights: 3.0 MiB on disk" in text
    assert "epoch 1.2/4, loss 6.5, k-NN 40.0% (epoch 1), me:1, heartbeat" in text
    lost = store.Claim(**{**claim.__dict__, "attempts": claim.attempts + 1})
    assert not store.heartbeat(db, lost, points=[(2.0, 20, "loss", 1.0)])  # not the owner: nothing
    assert db.run(lambda s: s.scalar(select(func.count(MetricRow.id)))) == 4
    db.dispose()


def test_checkpoint_root__beside_sqlite_else_under_results_and_an_override_wins(tmp_path: Path) -> None:
    from harness.study.artifacts import checkpoint_root, trial_folder

    assert (
        checkpoint_root(tmp_path / "runs" / "mine.db") == (tmp_path / "runs" / "mine-checkpoints").absolute()
    )
    assert checkpoint_root("postgresql://u@h/db") == (Path("results") / "harness-checkpoints").absolute()
    assert checkpoint_root(None, tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert trial_folder(tmp_path, "s", 7) == tmp_path / "s" / "trial-7"


def test_with_current_keeping_knobs__the_file_as_it_is_now_decides_how_a_trial_is_kept(
    tmp_path: Path,
) -> None:
    from harness.spec import resolve
    from harness.study.artifacts import with_current_keeping_knobs

    stored = resolve({"method": "simclr", "checkpoint_minutes": 1.0, "save_weights": False})
    study = load_study(study_file(tmp_path, "simclr"))  # sets checkpoint_epochs: 1, not the others
    now = with_current_keeping_knobs(stored, study)
    assert (now.checkpoint_epochs, now.checkpoint_minutes, now.save_weights) == (1, 5.0, True)
    assert now.config_hash == stored.config_hash
    # Every knob outside the identity but the seed and the device follows the file as it is now.
    stored = resolve({"method": "simclr", "devices_per_trial": 2, "compile_augmentation": True, "seed": 3})
    now = with_current_keeping_knobs(stored, study)
    assert (now.devices_per_trial, now.compile_augmentation, now.seed) == (1, False, 3)


def test_harness_weights__lists_prints_copies_and_checks_the_sha256(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from datetime import timedelta

    import torch

    from harness import checkpoint, cli
    from harness.backbones import build_backbone
    from harness.db import utcnow
    from harness.study import store

    db_path = tmp_path / "h.db"
    db = Database(db_path)
    report = store.sync_study(db, load_study(study_file(tmp_path, "simclr")))
    claim = store.claim_next(db, report.study_id, "me:1", stale_before=utcnow() - timedelta(seconds=90))
    assert claim is not None
    torch.manual_seed(0)
    backbone, _ = build_backbone("small_cnn", 1, 28)
    folder = tmp_path / "trial-1"
    path, sha256 = checkpoint.write_encoder(
        folder, "small_cnn", backbone, {"backbone": "small_cnn", "in_channels": 1, "image_size": 28}
    )
    summary = {"knn_top1": 0.625, "linear_top1": 0.5}
    artifacts = {"checkpoint_dir": str(folder), "weights_path": str(path), "weights_sha256": sha256}
    assert store.finish(
        db,
        claim,
        status="complete",
        reason=None,
        summary=summary,
        curves=[],
        provenance={},
        started_at=None,
        ended_at=None,
        artifacts=artifacts,
    )
    db.dispose()
    base = ["weights", "resume-simclr", "--db", str(db_path)]
    assert cli.main(base) == 0
    assert f"#1 simclr seed 0: knn_top1 0.6250  {path}" in capsys.readouterr().out
    assert cli.main([*base, "--best", "knn_top1"]) == 0
    assert capsys.readouterr().out.strip() == str(path)
    assert cli.main([*base, "--trial", "1", "--copy", str(tmp_path / "out") + "/"]) == 0
    assert (tmp_path / "out" / "encoder.safetensors").read_bytes() == path.read_bytes()
    assert (tmp_path / "out" / "encoder.json").is_file()
    assert cli.main([*base, "--trial", "9"]) == 2
    assert "--trial 9: no such trial in study resume-simclr" in capsys.readouterr().err
    assert cli.main(["weights", "nope", "--db", str(db_path)]) == 2
    assert "no study named 'nope' (studies: resume-simclr)" in capsys.readouterr().err
    assert cli.main([*base, "--copy", str(tmp_path / "x")]) == 2
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    assert cli.main([*base, "--trial", "1"]) == 1
    assert "changed since the trial recorded it" in capsys.readouterr().err
