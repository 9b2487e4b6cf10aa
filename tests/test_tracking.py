"""MLflow and TensorBoard trackers, fed by real trials, read back with each tool's own reader; a
failing tracker never fails a trial and warns once."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest

from harness import tracking, train
from harness.spec import resolve
from harness.tracking import TrackingSettings, TrialIdentity, mlflow_store, open_tracker

TINY = {
    "dataset": "synthetic",
    "train_size": 96,
    "test_size": 40,
    "batch_size": 32,
    "epochs": 2,
    "knn_k": 5,
    "linear_epochs": 2,
    "log_every": 1,
    "proj_hidden_dim": 32,
    "proj_dim": 16,
}


@pytest.fixture(autouse=True)
def _fresh_failures() -> None:
    tracking.reset_failures()


def _identity(config: train.TrialConfig, trial_id: int = 7) -> TrialIdentity:
    return TrialIdentity(
        study="tracked-study",
        trial_id=trial_id,
        label=f"{config.method} · lr={config.lr:g}",
        seed=config.seed,
        config_hash="0123456789abcdef" * 4,
        config=config.to_dict(),
        description="a study mirrored to trackers",
    )


def _tracked_trial(settings: TrackingSettings, weights: Path | None = None, **overrides: object):
    config = resolve({**TINY, **overrides})
    tracker = open_tracker(settings, _identity(config))
    assert tracker is not None
    record = train.run_trial(config, progress=False, sink=tracker)
    tracker.finish(record.status, record.reason, record.summary, [weights] if weights else [])
    return config, record


def test_open_tracker__off_by_default() -> None:
    assert not TrackingSettings().enabled
    assert open_tracker(TrackingSettings(), _identity(resolve(TINY))) is None
    assert open_tracker(None, _identity(resolve(TINY))) is None


def test_mlflow_store__folder_becomes_a_sqlite_store_and_uris_pass_through(tmp_path: Path) -> None:
    uri, artifacts = mlflow_store(str(tmp_path / "mlruns"))
    assert uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert artifacts == (tmp_path / "mlruns" / "artifacts").as_uri()
    for given in ("http://127.0.0.1:5000", "sqlite:///x.db", "file:///tmp/mlruns", "databricks"):
        assert mlflow_store(given) == (given, None)


def test_tracking_settings__command_line_over_file() -> None:
    file = TrackingSettings(mlflow="a", tensorboard="tb")
    assert file.merged(TrackingSettings(mlflow="b")) == TrackingSettings(mlflow="b", tensorboard="tb")
    assert TrackingSettings().merged(file) == file


@pytest.mark.slow
def test_mlflow__a_run_per_trial_with_params_curves_summary_and_weights(tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow", reason="the tracking extra is not installed")
    weights = tmp_path / "encoder.safetensors"
    weights.write_bytes(b"weights")
    store = tmp_path / "mlruns"
    config, record = _tracked_trial(TrackingSettings(mlflow=str(store)), weights, method="simclr")
    assert record.status == "complete", record.reason

    client = mlflow.MlflowClient(tracking_uri=mlflow_store(str(store))[0])
    experiment = client.get_experiment_by_name("tracked-study")
    assert experiment is not None
    assert experiment.tags["harness.description"] == "a study mirrored to trackers"
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"#7 simclr · lr={config.lr:g} seed=0"
    assert run.data.tags["harness.trial_id"] == "7"
    assert run.data.tags["harness.status"] == "complete"
    assert run.data.params["method"] == "simclr"
    assert float(run.data.params["lr"]) == config.lr
    assert int(run.data.params["batch_size"]) == 32
    for name in ("loss", "lr", "knn_top1"):
        ours = [(step, value) for _, step, n, value in record.curves if n == name]
        theirs = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
        assert [step for step, _ in sorted(theirs)] == [step for step, _ in sorted(ours)], name
        assert [v for _, v in sorted(theirs)] == pytest.approx([v for _, v in sorted(ours)]), name
    assert run.data.metrics["final/knn_top1"] == pytest.approx(record.summary["knn_top1"])
    assert run.data.metrics["final/final_loss"] == pytest.approx(record.summary["final_loss"])
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["encoder.safetensors"]
    assert (store / "artifacts" / "tracked-study").is_dir()


@pytest.mark.slow
def test_tensorboard__one_event_directory_per_trial_read_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tracking extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tmp_path / "runs"
    _, first = _tracked_trial(TrackingSettings(tensorboard=str(root)), method="simclr", seed=0)
    _, second = _tracked_trial(TrackingSettings(tensorboard=str(root)), method="simclr", seed=1)
    folders = sorted(p.name for p in (root / "tracked-study").iterdir())
    assert folders == ["trial-7_simclr_lr=0.001_seed0", "trial-7_simclr_lr=0.001_seed1"]
    events = EventAccumulator(str(root / "tracked-study" / folders[0]))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss", "lr", "knn_top1", "final/knn_top1"} <= set(scalars)
    ours = [(step, value) for _, step, n, value in first.curves if n == "loss"]
    theirs = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [step for step, _ in theirs] == [step for step, _ in ours]
    assert [v for _, v in theirs] == pytest.approx([v for _, v in ours], rel=1e-6)  # float32 on disk
    (final,) = events.Scalars("final/knn_top1")
    assert final.value == pytest.approx(first.summary["knn_top1"], rel=1e-6)
    assert "configuration" in " ".join(events.Tags()["tensors"])
    assert second.status == "complete"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_tracking__an_unreachable_server_warns_once_and_the_trials_complete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("mlflow", reason="the tracking extra is not installed")
    settings = TrackingSettings(mlflow=f"http://127.0.0.1:{_closed_port()}", tensorboard=str(tmp_path / "tb"))
    _, first = _tracked_trial(settings, epochs=1)
    _, second = _tracked_trial(settings, epochs=1, seed=1)
    assert first.status == second.status == "complete"
    assert math.isfinite(first.summary["knn_top1"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "tracking failed" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: MLflow tracking failed")
    # The other tracker is unaffected.
    assert len(list((tmp_path / "tb" / "tracked-study").iterdir())) == 2


def test_tracking__a_tracker_raising_mid_trial_is_switched_off(capsys: pytest.CaptureFixture[str]) -> None:
    class Broken:
        calls = 0

        def metric(self, name: str, value: float, step: int) -> None:
            Broken.calls += 1
            raise OSError("disk full")

        def finish(self, *args: object) -> None:
            raise AssertionError("never reached: the tracker is off after its first error")

    tracker = tracking.TrialTracker(TrackingSettings(), _identity(resolve(TINY)))
    tracker._runs.append((tracking._Guarded("TensorBoard"), Broken()))
    for step in range(5):
        tracker.on_metric("loss", 1.0, step=step, epoch=0.0)
    tracker.finish("complete")
    assert Broken.calls == 1
    assert capsys.readouterr().err.count("TensorBoard tracking failed (OSError: disk full)") == 1


@pytest.mark.slow
def test_harness_run__file_and_flag_switch_trackers_on_for_every_trial(tmp_path: Path) -> None:
    import subprocess
    import sys

    mlflow = pytest.importorskip("mlflow", reason="the tracking extra is not installed")
    from sqlalchemy import select

    from harness.db import Database, TrialRow

    study = tmp_path / "tracked.yaml"
    study.write_text(
        "study: tracked\n"
        "dataset: synthetic\n"
        "fixed: {train_size: 64, test_size: 32, batch_size: 32, epochs: 1, knn_k: 5, linear_epochs: 1,"
        " proj_hidden_dim: 32, proj_dim: 16}\n"
        "grid:\n  method: [simclr, random_init]\n"
        f"tracking: {{tensorboard: {tmp_path / 'tb'}}}\n"
    )
    db_path = tmp_path / "h.db"
    run = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(study), "--db", str(db_path), "--no-progress",
         "--mlflow", str(tmp_path / "ml")],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tracking failed" not in run.stdout + run.stderr
    db = Database(db_path)
    rows = db.run(lambda s: [(r.id, r.config["method"], r.knn_top1) for r in s.scalars(select(TrialRow))])
    db.dispose()
    client = mlflow.MlflowClient(tracking_uri=mlflow_store(str(tmp_path / "ml"))[0])
    experiment = client.get_experiment_by_name("tracked")
    runs = {r.data.tags["harness.trial_id"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {str(trial_id) for trial_id, _, _ in rows}
    for trial_id, method, knn in rows:
        mirrored = runs[str(trial_id)]
        assert mirrored.info.status == "FINISHED" and mirrored.data.params["method"] == method
        assert mirrored.data.metrics["final/knn_top1"] == pytest.approx(knn)
        # The trained encoder's weights are the run's artifact (random_init's too: an encoder).
        kept = sorted(a.path for a in client.list_artifacts(mirrored.info.run_id))
        assert kept == ["encoder.json", "encoder.safetensors"], (method, kept)
    folders = sorted(p.name for p in (tmp_path / "tb" / "tracked").iterdir())
    assert len(folders) == 2 and all(f.startswith("trial-") for f in folders)
