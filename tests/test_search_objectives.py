"""Multi-objective searches (study file side) and the study file's tracking: section."""

from __future__ import annotations

import pytest

from harness.spec import SpecError, parse_study

BASE = """\
study: mo
dataset: synthetic
fixed: {train_size: 64, test_size: 32, batch_size: 32, epochs: 1}
search:
  n_trials: 4
  sampler: SAMPLER
  objective: OBJECTIVE
  space:
    lr: {low: 1.0e-4, high: 1.0e-2, log: true}
seeds: [3]
"""
TWO = "[{metric: knn_top1, direction: maximize}, {metric: train_img_per_s, direction: maximize}]"


def _study(sampler: str = "nsga2", objective: str = TWO, extra: str = ""):
    return parse_study(BASE.replace("SAMPLER", sampler).replace("OBJECTIVE", objective) + extra, source="mo.yaml")


def _problems(*args: str) -> list[str]:
    with pytest.raises(SpecError) as error:
        _study(*args)
    return error.value.problems


def test_parse_study__a_list_of_objectives_is_a_multi_objective_search() -> None:
    search = _study().search
    assert search is not None and search.multi_objective
    assert search.all_objectives == (("knn_top1", "maximize"), ("train_img_per_s", "maximize"))
    assert (search.metric, search.direction) == ("knn_top1", "maximize")  # the first one
    assert search.pruner == "none"  # Optuna does not prune multi-objective studies


def test_parse_study__one_objective_is_unchanged() -> None:
    search = _study("tpe", "{metric: final_loss, direction: minimize}").search
    assert search is not None and not search.multi_objective
    assert search.all_objectives == (("final_loss", "minimize"),) and search.objectives == ()
    assert _study("tpe", "[{metric: final_loss, direction: minimize}]").search.all_objectives == (
        ("final_loss", "minimize"),
    )


def test_parse_study__multi_objective_problems_are_located() -> None:
    assert _problems("cmaes") == [
        "mo.yaml: search.sampler: found 'cmaes' with several objectives, expected one of tpe, random, grid, nsga2"
    ]
    assert _problems("nsga2", "[{metric: knn_top1}, {metric: knn_top1, direction: up}]") == [
        "mo.yaml: search.objective[1].metric: found 'knn_top1' twice, expected distinct objectives",
        "mo.yaml: search.objective[1].direction: found 'up', expected maximize or minimize",
    ]
    assert _problems("nsga2", "[]")[0].startswith("mo.yaml: search.objective: found an empty list")
    pruned = BASE.replace("SAMPLER", "tpe").replace("OBJECTIVE", TWO).replace("n_trials: 4", "n_trials: 4\n  pruner: median")
    with pytest.raises(SpecError) as error:
        parse_study(pruned, source="mo.yaml")
    assert error.value.problems == [
        "mo.yaml: search.pruner: found 'median', expected none with several objectives "
        "(Optuna prunes single-objective searches only)"
    ]


def test_parse_study__tracking_section() -> None:
    study = _study(extra="tracking: {mlflow: true, tensorboard: tb/logs}\n")
    assert dict(study.tracking) == {"mlflow": "mlruns", "tensorboard": "tb/logs"}
    assert dict(_study(extra="tracking: {mlflow: false}\n").tracking) == {}
    assert dict(_study().tracking) == {}
    with pytest.raises(SpecError) as error:
        _study(extra="tracking: {mlflw: true, tensorboard: 3}\n")
    assert error.value.problems == [
        "mo.yaml: tracking.mlflw: unknown tracker (did you mean 'mlflow'?); expected one of mlflow, tensorboard",
        "mo.yaml: tracking.tensorboard: found 3, expected a location (a URI or a folder), true or false",
    ]


# ---------------------------------------------------------------------------------------------
# Running them: named metrics, study attributes, seeded samplers, the Pareto front in Optuna

import math  # noqa: E402
from pathlib import Path  # noqa: E402

import optuna  # noqa: E402
from sqlalchemy import select  # noqa: E402

from harness.db import SUMMARY_METRICS, Database, TrialRow, utcnow  # noqa: E402
from harness.spec import TrialConfig, load_study  # noqa: E402
from harness.study import RunOptions, run_study  # noqa: E402
from harness.train import TrialRecord  # noqa: E402

SEARCH = """\
study: {name}
description: accuracy against speed
dataset: synthetic
fixed: {{method: simclr, train_size: 64, test_size: 32, batch_size: 32, epochs: 1, knn_k: 5}}
search:
  n_trials: {n}
  sampler: {sampler}
  objective: {objective}
  space:
    lr: {{low: 1.0e-4, high: 1.0e-1, log: true}}
    temperature: {{low: 0.05, high: 1.0}}
seeds: [{seed}]
"""


def trade_off(config: TrialConfig, **_: object) -> TrialRecord:
    """A fake trainer whose accuracy and throughput pull against each other (a real Pareto front)."""
    summary: dict[str, float | None] = dict.fromkeys(SUMMARY_METRICS)
    x = (math.log10(config.lr) + 4) / 3  # 0..1 over the space
    summary["knn_top1"] = 0.5 + 0.4 * x - 0.1 * abs(config.temperature - 0.5)
    summary["train_img_per_s"] = 1000.0 * (1.2 - x) + 50 * config.temperature
    return TrialRecord("complete", None, summary, [], {}, utcnow(), utcnow())


def _run(tmp_path: Path, db_name: str, *, name: str = "mo", n: int = 6, sampler: str = "tpe",
         objective: str = TWO, seed: int = 0) -> str:
    path = tmp_path / f"{name}-{db_name}.yaml"
    path.write_text(SEARCH.format(name=name, n=n, sampler=sampler, objective=objective, seed=seed))
    url = f"sqlite:///{tmp_path / db_name}"
    run_study(load_study(path), RunOptions(db=url), run_trial=trade_off, echo=lambda _: None)
    return url


def _points(url: str, name: str = "mo") -> list[tuple[float, float]]:
    study = optuna.load_study(study_name=name, storage=url)
    return [(t.params["lr"], t.params["temperature"]) for t in sorted(study.trials, key=lambda t: t.number)]


def test_search__metric_names_and_study_attributes_for_the_dashboard(tmp_path: Path) -> None:
    url = _run(tmp_path, "a.db", n=2, objective="{metric: knn_top1, direction: maximize}")
    study = optuna.load_study(study_name="mo", storage=url)
    assert study.metric_names == ["knn_top1"]
    assert study.user_attrs["description"] == "accuracy against speed"
    assert study.user_attrs["fixed"]["train_size"] == 64 and study.user_attrs["fixed"]["method"] == "simclr"
    assert study.user_attrs["objectives"] == ["maximize knn_top1"]
    assert study.user_attrs["sampler"] == "tpe (seed 0)"


@pytest.mark.parametrize("sampler", ["tpe", "random", "nsga2"])
def test_search__same_file_and_seed_propose_the_same_points(tmp_path: Path, sampler: str) -> None:
    first = _points(_run(tmp_path, "a.db", sampler=sampler))
    second = _points(_run(tmp_path, "b.db", sampler=sampler))
    other_seed = _points(_run(tmp_path, "c.db", sampler=sampler, seed=1))
    assert len(first) == 6 and first == second
    assert other_seed != first


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] >= b[0] and a[1] >= b[1] and a != b


@pytest.mark.parametrize("sampler", ["nsga2", "tpe"])
def test_search__multi_objective_front_in_optuna_matches_the_harness_rows(tmp_path: Path, sampler: str) -> None:
    url = _run(tmp_path, "mo.db", n=8, sampler=sampler)
    study = optuna.load_study(study_name="mo", storage=url)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    assert study.metric_names == ["knn_top1", "train_img_per_s"]
    db = Database(url)
    rows = db.run(lambda s: list(s.scalars(select(TrialRow).where(TrialRow.status == "complete"))))
    db.dispose()
    assert len(rows) == 8
    points = {r.optuna_number: (r.knn_top1, r.train_img_per_s) for r in rows}
    front = {n for n, p in points.items() if not any(_dominates(q, p) for q in points.values())}
    assert {t.number for t in study.best_trials} == front
    for trial in study.trials:
        assert trial.values == pytest.approx(list(points[trial.number]))


@pytest.mark.slow
def test_report__multi_objective_search_shows_its_pareto_front(tmp_path: Path) -> None:
    from harness.reports import build_report

    url = _run(tmp_path, "mo.db", n=8, sampler="nsga2")
    out = build_report(url, "mo", tmp_path / "report")
    markdown = (out / "report.md").read_text()
    assert "Objectives: maximize k-NN top-1 (%) and maximize throughput (img/s)." in markdown
    section = markdown.split("### Pareto front", 1)[1].split("\n### ", 1)[0]
    assert "![Pareto front of the search](figures/search_pareto.svg)" in section
    header = next(line for line in section.splitlines() if line.startswith("| Optuna trial"))
    assert header.startswith("| Optuna trial | harness trial | k-NN top-1 (%) | throughput (img/s) | lr | temperature |")
    rows = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    listed = {int(line.split(" | ")[0].strip("| ")) for line in rows}
    study = optuna.load_study(study_name="mo", storage=url)
    assert listed == {t.number for t in study.best_trials}
    by_number = {t.number: t for t in study.trials}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        trial = by_number[int(cells[0])]
        assert float(cells[2]) == pytest.approx(100 * trial.values[0], abs=0.05)  # percent, 1 decimal
        assert float(cells[3]) == pytest.approx(trial.values[1], rel=1e-3)
    assert (out / "figures" / "search_pareto.svg").is_file()
    assert "### Best trials" in markdown and "### Parameter importances" in markdown


@pytest.mark.slow
def test_optuna_dashboard__serves_the_search_with_named_metrics(tmp_path: Path) -> None:
    """The README's claim: optuna-dashboard on the harness database shows the search, its objectives
    by name and the study's attributes (started on a loopback port, queried through its API)."""
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    binary = Path(sys.executable).parent / "optuna-dashboard"
    if not binary.exists():
        pytest.skip("optuna-dashboard is not installed (it is in the dev extra)")
    url = _run(tmp_path, "mo.db", n=4, sampler="nsga2")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(binary), url, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )

    def get(path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return json.loads(response.read())

    try:
        studies = None
        deadline = time.monotonic() + 120
        while studies is None:
            try:
                studies = get("/api/studies")["study_summaries"]
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the dashboard did not start: {server.stdout.read()}") from None
                time.sleep(0.5)
        (study,) = [s for s in studies if s["study_name"] == "mo"]
        assert study["directions"] == ["maximize", "maximize"]
        detail = get(f"/api/studies/{study['study_id']}")
        assert detail["objective_names"] == ["knn_top1", "train_img_per_s"]
        attributes = {a["key"]: a["value"] for a in detail["user_attrs"]}
        assert attributes["description"] == "accuracy against speed"
        assert json.loads(attributes["objectives"]) == ["maximize knn_top1", "maximize train_img_per_s"]
        assert len(detail["trials"]) == 4 and detail["best_trials"]
    finally:
        server.terminate()
        server.wait(timeout=30)
