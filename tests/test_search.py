"""Optuna searches stored in the harness database: pruning, enqueued points, the trial budget
across runs and processes, reuse of known configurations, and reruns of abandoned trials."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from sqlalchemy import create_engine, func, inspect, select

from harness.db import SUMMARY_METRICS, Database, MetricRow, StudyRow, TrialRow, resolve_url, utcnow
from harness.spec import SearchParam, TrialConfig, load_study
from harness.study import RunOptions, SearchSetupError, run_study, search_problems
from harness.study.search import SUPERSEDED, grid_values
from harness.train import TrialPruned, TrialRecord

FIXED = {
    "method": "simclr",
    "dataset": "synthetic",
    "train_size": 64,
    "test_size": 32,
    "batch_size": 32,
    "epochs": 2,
    "eval_every": 1,
    "proj_hidden_dim": 32,
    "proj_dim": 16,
    "linear_epochs": 2,
    "knn_k": 5,
}


def search_file(
    tmp_path: Path,
    space: str,
    *,
    n_trials: int = 6,
    sampler: str = "random",
    pruner: str = "median",
    extra: str = "",
    name: str = "srch",
    direction: str = "maximize",
) -> Path:
    lines = [f"study: {name}", "description: a tiny search", "fixed:"]
    lines += [f"  {k}: {v}" for k, v in FIXED.items()]
    lines += [
        "search:",
        f"  n_trials: {n_trials}",
        f"  sampler: {sampler}",
        f"  pruner: {pruner}",
        f"  objective: {{metric: knn_top1, direction: {direction}}}",
        "  space:",
        *(f"    {line}" for line in space.strip().splitlines()),
    ]
    if extra:
        lines += [f"  {line}" for line in extra.strip().splitlines()]
    lines.append("seeds: [0]")
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


SPACE = """\
temperature: {low: 0.05, high: 1.0, log: true}
lr: {low: 0.0001, high: 0.01, log: true}
"""


class Crash(BaseException):
    """Stands for the process dying mid-trial: nothing below the runner catches it."""


class Scripted:
    """A fake trainer: reports k-NN values that get worse with every call (so the median pruner
    prunes late trials), and can crash or be interrupted on a given call."""

    def __init__(self, *, crash_on: int | None = None, interrupt_on: int | None = None) -> None:
        self.counter = itertools.count(1)
        self.calls: list[TrialConfig] = []
        self.crash_on = crash_on
        self.interrupt_on = interrupt_on

    def __call__(
        self,
        config: TrialConfig,
        *,
        on_eval: Callable[[int, float], None] | None = None,
        progress: bool | None = None,
        **_: object,  # checkpoint_dir, on_curves, say: not used by this stand-in
    ) -> TrialRecord:
        call = next(self.counter)
        self.calls.append(config)
        if call == self.crash_on:
            raise Crash
        if call == self.interrupt_on:
            raise KeyboardInterrupt
        started = utcnow()
        value = 0.9 - 0.1 * call
        curves: list[tuple[float, int, str, float]] = []
        try:
            for epoch in (1, 2):
                curves.append((float(epoch), epoch * 2, "loss", 1.0 / epoch))
                curves.append((float(epoch), epoch * 2, "knn_top1", value))
                if on_eval is not None:
                    on_eval(epoch, value)
        except TrialPruned as pruned:
            return TrialRecord(
                "pruned", str(pruned), dict.fromkeys(SUMMARY_METRICS), curves, {}, started, utcnow()
            )
        summary: dict[str, float | None] = dict.fromkeys(SUMMARY_METRICS)
        summary["knn_top1"] = value
        return TrialRecord("complete", None, summary, curves, {}, started, utcnow())


def quiet(_: str) -> None:
    return None


def our_rows(db: Database) -> list[TrialRow]:
    return db.run(lambda s: list(s.scalars(select(TrialRow).order_by(TrialRow.id))))


def curve_points(db: Database, trial_id: int) -> int:
    return db.run(lambda s: s.scalar(select(func.count(MetricRow.id)).where(MetricRow.trial_id == trial_id)))


def counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if not t.user_attrs.get(SUPERSEDED)]


def test_search__pruned_trials_are_recorded_pruned_with_their_curves(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    result = run_study(
        load_study(search_file(tmp_path, SPACE)), RunOptions(db=url), run_trial=Scripted(), echo=quiet
    )
    assert result.exit_code == 0
    db = Database(url)
    rows = our_rows(db)
    assert len(rows) == 6
    # The median pruner waits for 5 finished trials; the 6th reports worse than all of them.
    assert [r.status for r in rows] == ["complete"] * 5 + ["pruned"]
    pruned = rows[-1]
    assert pruned.reason is not None and pruned.reason.startswith("pruned at epoch 1")
    assert curve_points(db, pruned.id) == 2  # up to the pruning evaluation
    study = optuna.load_study(study_name="srch", storage=url)
    by_number = {t.number: t for t in study.trials}
    assert sorted(r.optuna_number for r in rows) == sorted(by_number) == list(range(6))
    for row in rows:
        trial = by_number[row.optuna_number]
        assert trial.user_attrs["harness_trial_id"] == row.id
        if row.status == "complete":
            assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == pytest.approx(
                row.knn_top1
            )
        else:
            assert trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values == {
                1: pytest.approx(0.3)
            }
        assert row.config["temperature"] == pytest.approx(trial.params["temperature"])


def test_search__enqueued_points_run_first_and_only_once(tmp_path: Path) -> None:
    extra = "enqueue:\n  - {temperature: 0.5, lr: 0.001}\n  - {temperature: 0.1, lr: 0.002}"
    path = search_file(tmp_path, SPACE, n_trials=3, extra=extra)
    trainer = Scripted()
    run_study(load_study(path), RunOptions(db=str(tmp_path / "h.db")), run_trial=trainer, echo=quiet)
    assert [(c.temperature, c.lr) for c in trainer.calls[:2]] == [(0.5, 0.001), (0.1, 0.002)]
    # A rerun with more trials does not enqueue the known points again.
    path.write_text(path.read_text().replace("n_trials: 3", "n_trials: 4"))
    trainer = Scripted()
    run_study(load_study(path), RunOptions(db=str(tmp_path / "h.db")), run_trial=trainer, echo=quiet)
    assert len(trainer.calls) == 1 and (trainer.calls[0].temperature, trainer.calls[0].lr) not in {
        (0.5, 0.001),
        (0.1, 0.002),
    }


def test_search__n_trials_counts_across_runs(tmp_path: Path) -> None:
    path = search_file(tmp_path, SPACE, n_trials=5, pruner="none")
    url = str(tmp_path / "h.db")
    first = Scripted()
    run_study(load_study(path), RunOptions(db=url, max_trials=2), run_trial=first, echo=quiet)
    second = Scripted()
    run_study(load_study(path), RunOptions(db=url), run_trial=second, echo=quiet)
    third = Scripted()
    run_study(load_study(path), RunOptions(db=url), run_trial=third, echo=quiet)
    assert (len(first.calls), len(second.calls), len(third.calls)) == (2, 3, 0)
    assert len(our_rows(Database(url))) == 5


def test_search__a_sampled_known_configuration_reuses_its_result(tmp_path: Path) -> None:
    path = search_file(tmp_path, "lr: {choices: [0.001, 0.002]}", n_trials=6, pruner="none")
    trainer = Scripted()
    lines: list[str] = []
    result = run_study(
        load_study(path), RunOptions(db=str(tmp_path / "h.db")), run_trial=trainer, echo=lines.append
    )
    trained = [c.lr for c in trainer.calls]
    assert len(trained) == len(set(trained)) <= 2
    assert result.tally.reused == 6 - len(trained)
    assert any("reused its knn_top1" in line for line in lines)
    study = optuna.load_study(study_name="srch", storage=f"sqlite:///{tmp_path / 'h.db'}")
    values = {r.config["lr"]: r.knn_top1 for r in our_rows(Database(tmp_path / "h.db"))}
    assert len(study.trials) == 6
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.value == pytest.approx(values[trial.params["lr"]])


def test_search__grid_sampler_covers_the_grid(tmp_path: Path) -> None:
    space = "lr: {choices: [0.001, 0.002]}\ntemperature: {low: 0.1, high: 0.3, step: 0.1}"
    path = search_file(tmp_path, space, n_trials=6, sampler="grid", pruner="none")
    trainer = Scripted()
    run_study(load_study(path), RunOptions(db=str(tmp_path / "h.db")), run_trial=trainer, echo=quiet)
    assert sorted((c.lr, round(c.temperature, 6)) for c in trainer.calls) == [
        (lr, t) for lr in (0.001, 0.002) for t in (0.1, 0.2, 0.3)
    ]


def test_search__hyperband_pruner_runs(tmp_path: Path) -> None:
    path = search_file(tmp_path, SPACE, n_trials=4, sampler="tpe", pruner="hyperband")
    result = run_study(
        load_study(path), RunOptions(db=str(tmp_path / "h.db")), run_trial=Scripted(), echo=quiet
    )
    assert result.exit_code == 0 and len(our_rows(Database(tmp_path / "h.db"))) == 4


def test_search__interrupted_trial_is_rerun_and_does_not_use_the_budget(tmp_path: Path) -> None:
    path = search_file(tmp_path, SPACE, n_trials=3, pruner="none")
    url = str(tmp_path / "h.db")
    result = run_study(load_study(path), RunOptions(db=url), run_trial=Scripted(interrupt_on=2), echo=quiet)
    assert result.exit_code == 130
    rows = our_rows(Database(url))
    assert [(r.status, r.reason) for r in rows] == [("complete", None), ("pending", "interrupted")]
    interrupted = rows[1]
    trainer = Scripted()
    assert run_study(load_study(path), RunOptions(db=url), run_trial=trainer, echo=quiet).exit_code == 0
    assert trainer.calls[0].temperature == pytest.approx(interrupted.config["temperature"])
    rows = our_rows(Database(url))
    assert [r.status for r in rows] == ["complete"] * 3
    study = optuna.load_study(study_name="srch", storage=f"sqlite:///{url}")
    assert len(counted(study)) == 3
    old = study.trials[interrupted.optuna_number]
    assert old.state == optuna.trial.TrialState.FAIL and old.user_attrs[SUPERSEDED]
    rerun = study.trials[rows[1].optuna_number]
    assert rerun.state == optuna.trial.TrialState.COMPLETE and rerun.params == old.params


def test_search__a_dead_workers_trial_is_taken_over(tmp_path: Path) -> None:
    path = search_file(tmp_path, SPACE, n_trials=3, pruner="none")
    url = str(tmp_path / "h.db")
    with pytest.raises(Crash):
        run_study(
            load_study(path),
            RunOptions(db=url, heartbeat_timeout=0.5),
            run_trial=Scripted(crash_on=2),
            echo=quiet,
        )
    rows = our_rows(Database(url))
    assert [r.status for r in rows] == ["complete", "running"]
    time.sleep(1.0)  # the dead worker's heartbeat goes stale
    lines: list[str] = []
    trainer = Scripted()
    run_study(
        load_study(path), RunOptions(db=url, heartbeat_timeout=0.5), run_trial=trainer, echo=lines.append
    )
    assert any("taking over" in line for line in lines)
    rows = our_rows(Database(url))
    assert [r.status for r in rows] == ["complete"] * 3 and rows[1].attempts == 2
    study = optuna.load_study(study_name="srch", storage=f"sqlite:///{url}")
    assert len(counted(study)) == 3
    assert {t.state for t in counted(study)} == {optuna.trial.TrialState.COMPLETE}


def test_search__direction_cannot_change_under_one_name(tmp_path: Path) -> None:
    url = str(tmp_path / "h.db")
    run_study(
        load_study(search_file(tmp_path, SPACE, n_trials=1)),
        RunOptions(db=url),
        run_trial=Scripted(),
        echo=quiet,
    )
    flipped = load_study(search_file(tmp_path, SPACE, n_trials=2, direction="minimize"))
    with pytest.raises(SearchSetupError, match="rename"):
        run_study(flipped, RunOptions(db=url), run_trial=Scripted(), echo=quiet)


def test_search_problems__cmaes_is_available_as_a_dependency(tmp_path: Path) -> None:
    # log: true with step: is a SpecError of the file itself (tests/test_spec.py); what is left
    # here is the environment: cmaes is a declared dependency, so a cmaes search has no problem.
    cmaes = search_problems(load_study(search_file(tmp_path, SPACE, sampler="cmaes", name="cm")))
    assert cmaes == []


def test_grid_values__inclusive_and_typed() -> None:
    assert grid_values(SearchParam(name="batch_size", low=32, high=64, step=16)) == [32, 48, 64]
    assert grid_values(SearchParam(name="temperature", low=0.1, high=0.5, step=0.2)) == [0.1, 0.3, 0.5]
    assert grid_values(SearchParam(name="method", choices=("simclr", "byol"))) == ["simclr", "byol"]


@pytest.mark.slow
def test_search__two_processes_run_six_trials_with_a_pruner_into_one_database(
    tmp_path: Path, database_url: str
) -> None:
    path = search_file(tmp_path, SPACE, n_trials=6, sampler="tpe", pruner="median")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runners = [
        subprocess.Popen(
            [sys.executable, "-m", "harness", "run", str(path), "--db", database_url, "--no-progress"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [runner.communicate(timeout=300)[0] for runner in runners]
    for runner, output in zip(runners, outputs):
        assert runner.returncode == 0, output
        assert "locked" not in output.lower() and "Traceback" not in output, output
    # One database holds both: our tables and Optuna's.
    tables = set(inspect(create_engine(resolve_url(database_url))).get_table_names())
    assert {
        "harness_study",
        "harness_trial",
        "harness_metric",
        "studies",
        "trials",
        "trial_intermediate_values",
    } <= tables
    url = resolve_url(database_url)
    study = optuna.load_study(study_name="srch", storage=url)
    assert len(study.trials) == 6
    db = Database(url)
    rows = our_rows(db)
    assert len(rows) == 6 and len({r.worker for r in rows}) == 2
    assert sorted(r.optuna_number for r in rows) == list(range(6))
    states = {"complete": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED}
    for row in rows:
        trial = study.trials[row.optuna_number]
        assert states[row.status] == trial.state, (row.status, row.reason)
        assert curve_points(db, row.id) > 0
        if row.status == "complete":
            assert trial.value == pytest.approx(row.knn_top1)
    assert db.run(lambda s: s.scalar(select(StudyRow.kind))) == "search"


def test_search__runs_without_importing_torch_when_the_trainer_is_injected(tmp_path: Path) -> None:
    # The study layer needs torch only to train: TrialPruned comes from harness.trial_api.
    path = search_file(tmp_path, SPACE, n_trials=3, extra="", name="notorch")
    path.write_text(path.read_text().replace("fixed:\n", "fixed:\n  device: cpu\n"))
    script = f"""
import sys
from harness.db import SUMMARY_METRICS, utcnow
from harness.spec import load_study
from harness.study import RunOptions, run_study
from harness.trial_api import TrialPruned

class Record:
    def __init__(self, status, value, reason=None):
        self.status, self.reason, self.curves, self.provenance = status, reason, [], {{}}
        self.summary = dict.fromkeys(SUMMARY_METRICS, None)
        self.summary["knn_top1"] = value
        self.started_at = self.ended_at = utcnow()

def trainer(config, *, on_eval=None, progress=None, **_):
    try:
        on_eval(1, 0.5)
    except TrialPruned as pruned:
        return Record("pruned", None, str(pruned))
    return Record("complete", 0.5)

result = run_study(load_study({str(path)!r}), RunOptions(db={str(tmp_path / "h.db")!r}), run_trial=trainer, echo=print)
assert result.exit_code == 0 and result.tally.complete == 3, result
sys.exit(3 if "torch" in sys.modules else 0)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# A worker of the race below: it runs ROUNDS searches, starting each one together with the other
# processes (a barrier of files), with an instant trainer.
RACE_WORKER = """
import sys, time
from pathlib import Path
from harness.db import SUMMARY_METRICS, utcnow
from harness.spec import load_study
from harness.study import RunOptions, run_study

folder, url, index, rounds, processes = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

class Record:
    def __init__(self, value):
        self.status, self.reason, self.curves, self.provenance = "complete", None, [], {}
        self.summary = dict.fromkeys(SUMMARY_METRICS, None)
        self.summary["knn_top1"] = value
        self.started_at = self.ended_at = utcnow()

def trainer(config, *, on_eval=None, progress=None, **_):
    time.sleep(0.05)
    return Record(config.lr)

for r in range(rounds):
    (folder / f"ready-{r}-{index}").touch()
    while len(list(folder.glob(f"ready-{r}-*"))) < processes:
        time.sleep(0.002)
    result = run_study(load_study(folder / f"race{r}.yaml"), RunOptions(db=url), run_trial=trainer, echo=lambda line: None)
    assert result.exit_code == 0, result
"""


@pytest.mark.slow
def test_search__concurrent_postgresql_runners_reach_n_trials_with_enqueued_points_once(
    tmp_path: Path, postgres_url: str
) -> None:
    """Issue 13: three runners starting one search together on PostgreSQL could enqueue a point twice
    (enqueue_trial's skip_if_exists outside the search's lock); the copy was counted as a failed
    trial and the search ended one short of n_trials. Many rounds, so that the race shows."""
    rounds, processes, n_trials = 8, 3, 4
    enqueued = [(0.5, 0.001), (0.1, 0.002)]
    extra = "enqueue:\n" + "\n".join(f"  - {{temperature: {t}, lr: {lr}}}" for t, lr in enqueued)
    for r in range(rounds):
        search_file(tmp_path, SPACE, n_trials=n_trials, pruner="none", extra=extra, name=f"race{r}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runners = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_WORKER, str(tmp_path), postgres_url, str(i), str(rounds), str(processes)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]
    outputs = [runner.communicate(timeout=240)[0] for runner in runners]
    assert all(runner.returncode == 0 for runner in runners), "\n".join(outputs)
    db = Database(postgres_url)
    url = resolve_url(postgres_url)
    short = []
    for r in range(rounds):
        rows = db.run(
            lambda s, r=r: list(
                s.scalars(select(TrialRow).join(StudyRow).where(StudyRow.name == f"race{r}"))
            )
        )
        study = optuna.load_study(study_name=f"race{r}", storage=url)
        trials = counted(study)
        points = sorted((round(row.config["temperature"], 6), row.config["lr"]) for row in rows)
        if (
            len(rows) != n_trials
            or any(row.status != "complete" for row in rows)
            or len(trials) != n_trials
            or any(t.state != optuna.trial.TrialState.COMPLETE for t in trials)
            or any(points.count(point) != 1 for point in enqueued)
        ):
            short.append((r, [row.status for row in rows], [t.state.name for t in study.trials], points))
    assert not short, short


def test_search__a_duplicate_counted_failed_by_an_older_harness_is_reported_and_a_rerun_finishes(
    tmp_path: Path,
) -> None:
    """The state issue 13's race left behind: 2 of 3 trials ran, and a duplicate of an enqueued
    point was told FAIL without a harness row. It must not use a trial of n_trials."""
    from harness.study import status_lines

    extra = "enqueue:\n  - {temperature: 0.5, lr: 0.001}"
    path = search_file(tmp_path, SPACE, n_trials=3, pruner="none", extra=extra)
    url = f"sqlite:///{tmp_path / 'h.db'}"
    run_study(load_study(path), RunOptions(db=url, max_trials=2), run_trial=Scripted(), echo=quiet)
    study = optuna.load_study(study_name="srch", storage=url)
    duplicate = study.trials[0]  # the enqueued point, as the racing runner's copy of it
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL,
            params=duplicate.params,
            distributions=duplicate.distributions,
            system_attrs={"fixed_params": duplicate.params},
        )
    )
    db = Database(url)
    lines = status_lines(db, "srch")
    assert "  n_trials: 2 of 3 used: the search is 1 trial(s) short of n_trials; `harness run` its study file again to finish it" in lines
    trainer = Scripted()
    assert run_study(load_study(path), RunOptions(db=url), run_trial=trainer, echo=quiet).exit_code == 0
    assert len(trainer.calls) == 1
    assert [r.status for r in our_rows(db)] == ["complete"] * 3
    assert "  n_trials: 3 of 3 used" in status_lines(db, "srch")
    trainer = Scripted()
    run_study(load_study(path), RunOptions(db=url), run_trial=trainer, echo=quiet)
    assert trainer.calls == []  # finished: a further rerun runs nothing


def test_search__an_enqueued_point_already_in_the_study_does_not_use_a_trial(tmp_path: Path) -> None:
    """A second copy of an enqueued point (queued twice by runners that started together) is
    superseded when it is sampled after the first copy finished, instead of reusing its result."""
    extra = "enqueue:\n  - {temperature: 0.5, lr: 0.001}"
    path = search_file(tmp_path, SPACE, n_trials=3, pruner="none", extra=extra)
    url = f"sqlite:///{tmp_path / 'h.db'}"
    run_study(load_study(path), RunOptions(db=url, max_trials=1), run_trial=Scripted(), echo=quiet)
    study = optuna.load_study(study_name="srch", storage=url)
    study.enqueue_trial({"temperature": 0.5, "lr": 0.001})  # the copy (without skip_if_exists)
    lines: list[str] = []
    trainer = Scripted()
    run_study(load_study(path), RunOptions(db=url), run_trial=trainer, echo=lines.append)
    assert len(trainer.calls) == 2 and (0.5, 0.001) not in [(c.temperature, c.lr) for c in trainer.calls]
    assert any("an enqueued point already in the study" in line for line in lines), lines
    study = optuna.load_study(study_name="srch", storage=url)
    assert len(counted(study)) == 3 and len(study.trials) == 4
    assert len(our_rows(Database(url))) == 3
