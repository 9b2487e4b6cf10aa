"""Collapse flags of the reports (harness.reports.collapse) and how the comparison table shows them."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import report_fixtures

from harness.db import Database
from harness.reports import cli as report_cli
from harness.reports import collapse
from harness.reports.style import TABLE_METRICS
from harness.reports.tables import best_values, collapse_mark, collapse_notes, comparison_table

HEALTHY = {"method": "simclr", "final_loss": 3.3, "uniformity": -2.8, "effective_rank": 40.0}


def test_collapse_reasons__healthy_trial_has_none() -> None:
    assert collapse.collapse_reasons(HEALTHY) == []


def test_collapse_reasons__dino_loss_at_log_of_output_size() -> None:
    row = {**HEALTHY, "method": "dino", "dino_out_dim": 1024, "final_loss": math.log(1024) + 0.002}
    reasons = collapse.collapse_reasons(row)
    assert reasons == [f"loss {row['final_loss']:.3f} at its trivial value {math.log(1024):.3f}"]
    # The same loss is no collapse for a method whose trivial value is not known.
    assert collapse.collapse_reasons({**row, "method": "swav"}) == []


def test_collapse_reasons__simsiam_at_minus_one_uniformity_and_rank() -> None:
    row = {"method": "simsiam", "final_loss": -0.999, "uniformity": -0.02, "effective_rank": 1.3}
    reasons = collapse.collapse_reasons(row)
    assert len(reasons) == 3
    assert reasons[1] == "uniformity -0.02 near 0" and reasons[2] == "effective rank 1.30 near 1"


def test_collapse_reasons__missing_and_nan_values_flag_nothing() -> None:
    row = {"method": "dino", "dino_out_dim": None, "final_loss": math.nan, "uniformity": None}
    assert collapse.collapse_reasons(row) == []
    assert collapse.collapse_reasons(pd.Series({"method": "byol"})) == []


def test_collapse_reasons__untrained_baseline_never_collapsed() -> None:
    # A random CNN's features are concentrated (uniformity about -0.1 here) without any training.
    assert collapse.collapse_reasons({"method": "random_init", "uniformity": -0.11, "effective_rank": 7.2}) == []


def _frame() -> pd.DataFrame:
    rows = []
    for label, knn, collapsed in [
        ("simclr", 70.0, []),
        ("dino", 75.0, [(0, ["uniformity -0.10 near 0"]), (1, ["uniformity -0.12 near 0"])]),
        ("byol", 68.0, [(1, ["effective rank 1.50 near 1"])]),
        ("supcon", 80.0, []),
    ]:
        row = {
            "label": label,
            "method": label,
            "n": 2,
            "is_reference": False,
            "uses_labels": label == "supcon",
            "collapsed": collapsed,
        }
        for metric in TABLE_METRICS:
            row[f"{metric.column}_mean"] = knn if metric.column == "knn_top1" else 1.0
            row[f"{metric.column}_std"] = 0.5
            row[f"{metric.column}_nonfinite"] = 0
        rows.append(row)
    return pd.DataFrame(rows)


def test_comparison_table__collapsed_and_label_using_rows_marked_and_never_best() -> None:
    frame = _frame()
    knn = next(m for m in TABLE_METRICS if m.column == "knn_top1")
    # dino has a higher k-NN, but both its seeds collapsed, and supcon uses labels: simclr is the best.
    assert best_values(frame, knn) == 70.0
    table, _ = comparison_table(frame)
    labels = [row[0].text for row in table.rows]
    assert labels == ["simclr", "dino (collapsed)", "byol (1 of 2 collapsed)", "supcon [labels]"]
    assert not table.rows[3][table.columns.index(knn.label)].bold
    knn_column = table.columns.index(knn.label)
    assert table.rows[0][knn_column].bold and not table.rows[1][knn_column].bold
    assert [collapse_mark(r) for _, r in frame.iterrows()] == ["", " (collapsed)", " (1 of 2 collapsed)", ""]
    assert collapse_notes(frame) == [
        "dino collapsed (seed 0: uniformity -0.10 near 0; seed 1: uniformity -0.12 near 0).",
        "byol collapsed (seed 1: effective rank 1.50 near 1).",
    ]


def test_report_cli__all_over_several_databases_indexes_every_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [tmp_path / "grid.db", tmp_path / "ablation.db"]
    for path, fill in zip(paths, (report_fixtures.fill_grid, report_fixtures.fill_ablation)):
        database = Database(path)
        fill(database)
        database.dispose()
    argv = ["--all", "--db", str(paths[0]), "--db", str(paths[1]), "--out", str(tmp_path / "r")]
    assert report_cli.main(_parse(argv)) == 0
    page = (tmp_path / "r" / "index.html").read_text()
    assert sorted(re.findall(r'<a href="([^"]+/index\.html)">', page)) == [
        "method-grid/index.html",
        "moco-ablation/index.html",
    ]
    assert (tmp_path / "r" / "moco-ablation" / "report.md").is_file()
    assert "wrote 2 report(s)" in capsys.readouterr().out


def test_report_cli__several_databases_need_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_cli.main(_parse(["method-grid", "--db", "a.db", "--db", "b.db"])) == 2
    assert "several --db need --all" in capsys.readouterr().err


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="harness report")
    report_cli.add_arguments(parser)
    return parser.parse_args(argv)
