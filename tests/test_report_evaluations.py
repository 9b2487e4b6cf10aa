"""The report's evaluation section from a database with stored evaluations: label-efficiency,
few-shot and transfer tables (values and intervals against scipy), the figures, failures."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from harness.db import Database, EvaluationRow
from harness.protocol_spec import Task
from harness.reports import build_report
from harness.reports.data import load
from harness.reports.tables import evaluation_columns, evaluation_table
from harness.results import evaluations_frame
from harness.spec import parse_study

sys.path.insert(0, str(Path(__file__).parent))
import report_fixtures as fx

STUDY_TEXT = """\
study: eval-grid
description: Evaluations of saved encoders.
dataset: fashion-mnist
fixed: {backbone: small_cnn, epochs: 2, train_size: 1024, test_size: 256}
grid:
  method: [simclr, byol, random_init]
seeds: [0, 1, 2]
"""
# top-1 per (method, protocol, fraction or shots) and seed; simclr and byol are close on purpose
# (a tie at 10% fine-tune), random_init is far below.
BASE = {"simclr": 0.70, "byol": 0.69, "random_init": 0.40}
TASKS: tuple[Task, ...] = (
    Task("linear", None, 0.01, None, 0, (("epochs", None),)),
    Task("linear", None, 0.1, None, 0, (("epochs", None),)),
    Task("finetune", None, 0.01, None, 0, (("backbone_lr_scale", 0.1), ("epochs", 30), ("lr", 0.05))),
    Task("finetune", None, 0.1, None, 0, (("backbone_lr_scale", 0.1), ("epochs", 30), ("lr", 0.05))),
    Task("few_shot_knn", None, None, 3, 0, (("draws", 5),)),
    Task("knn", "digits", None, None, None, (("test_size", None), ("train_size", None))),
)
BUMP = {"linear": 0.0, "finetune": 0.05, "few_shot_knn": -0.2, "knn": -0.1}


def _value(method: str, task: Task, seed: int) -> float:
    fraction_gain = 0.08 if task.fraction == 0.1 else 0.0
    wiggle = [0.004, -0.006, 0.011][seed] * (1 if method == "simclr" else -1)
    return BASE[method] + BUMP[task.protocol] + fraction_gain + wiggle


def _add_evaluation(db: Database, trial_id: int, task: Task, **values: Any) -> None:
    def insert(session: Any) -> None:
        session.add(
            EvaluationRow(
                trial_id=trial_id,
                task_hash=hashlib.sha256(task.key.encode()).hexdigest(),
                task=json.loads(task.key),
                protocol=task.protocol,
                dataset=task.dataset or "fashion-mnist",
                transfer=task.dataset is not None,
                fraction=task.fraction,
                shots=task.shots,
                label_seed=task.label_seed,
                created_at=fx.T0,
                **values,
            )
        )

    db.run(insert)


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Database:
    db = Database(tmp_path_factory.mktemp("db") / "harness.db")
    study_id = fx._add_study(db, STUDY_TEXT, fx.T0)
    for index, config in enumerate(parse_study(STUDY_TEXT).trials()):
        trial_id = fx._add_trial(db, study_id, config, index, summary=fx._summary(config, config.seed))
        for task in TASKS:
            spread = 0.02 if task.protocol == "few_shot_knn" else None
            _add_evaluation(db, trial_id, task, status="complete", top1=_value(config.method, task, config.seed), spread=spread,
                            details={"adaptation": "none; normalized with the statistics of fashion-mnist"} if task.dataset else {})
        points = 30
        generator = np.random.default_rng(config.seed)
        _add_evaluation(
            db, trial_id, Task("embedding", None, None, None, None, (("points", points),)), status="complete",
            details={"x": generator.normal(size=points).round(3).tolist(), "y": generator.normal(size=points).round(3).tolist(),
                     "label": [i % 10 for i in range(points)], "class_names": [f"c{i}" for i in range(10)]},
        )
        if config.method == "byol" and config.seed == 2:
            _add_evaluation(db, trial_id, Task("knn", "mnist", None, None, None, ()), status="failed",
                            reason="DatasetNotFoundError: mnist not found")
    return db


def test_evaluations_frame__one_row_per_evaluation_with_its_protocol(database: Database) -> None:
    frame = evaluations_frame(database, "eval-grid")
    assert len(frame) == 9 * (len(TASKS) + 1) + 1
    row = frame[(frame["protocol"] == "finetune") & (frame["fraction"] == 0.1)].iloc[0]
    assert row["task"]["settings"] == {"backbone_lr_scale": 0.1, "epochs": 30, "lr": 0.05}
    assert not row["transfer"] and row["dataset"] == "fashion-mnist" and row["label_seed"] == 0
    assert evaluations_frame(database, "no-such-study").empty


def test_label_efficiency_table__values_intervals_and_column_order(database: Database) -> None:
    data = load(database, "eval-grid")
    columns = evaluation_columns(data.evaluations, "label_efficiency")
    assert [c.metric.label for c in columns] == [
        "linear · 1% labels (%)",
        "fine-tune · 1% labels (%)",
        "linear · 10% labels (%)",
        "fine-tune · 10% labels (%)",
    ]
    result = evaluation_table(data, "label_efficiency")
    assert result is not None
    table, frame, _ = result
    assert [row[0].text for row in table.rows] == ["simclr", "byol", "random_init"]
    assert table.reference_from == 2
    values = [100 * _value("simclr", TASKS[3], s) for s in range(3)]
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
    assert table.rows[0][5].text == f"{np.mean(values):.1f} ± {half:.1f}"
    # simclr is best everywhere; byol trails by a seed-dependent gap: a paired t-test decides.
    byol = [100 * _value("byol", TASKS[3], s) for s in range(3)]
    p = stats.ttest_rel(byol, values).pvalue
    verdict = frame.loc[frame["label"] == "byol", "e3_verdict"].iloc[0]
    assert verdict == ("tie" if p >= 0.05 else "worse")
    assert table.rows[1][5].bold == (p >= 0.05)
    assert table.rows[0][5].bold and not table.rows[2][5].bold  # the baseline is never marked


def test_report__evaluation_section_tables_and_figures(database: Database, tmp_path: Path) -> None:
    out = build_report(database, "eval-grid", tmp_path / "r")
    markdown = (out / "report.md").read_text()
    section = markdown.split("## Evaluations of the saved encoders", 1)[1].split("\n## ", 1)[0]
    for heading in ("### Label efficiency", "### Few-shot k-NN", "### Transfer", "### Embeddings", "### Failed evaluations"):
        assert heading in section
    assert "Label fractions are class-balanced draws" in section and "label seed 0" in section
    assert "the head starts at zero;" in section  # tasks stored before head_init existed
    assert "digits: none; normalized with the statistics of fashion-mnist" in section
    assert "| 3-shot k-NN (%) |" in section and "(draws sd 2.0)" in section
    assert "| digits · k-NN (%) |" in section
    assert "DatasetNotFoundError: mnist not found" in section
    assert (out / "figures" / "label_efficiency.svg").is_file()
    embedding = (out / "figures" / "embeddings.svg").read_text()
    assert "simclr (seed 0)" in embedding and "c9" in embedding
    again = build_report(database, "eval-grid", tmp_path / "again")
    assert (again / "report.md").read_text() == markdown  # deterministic
