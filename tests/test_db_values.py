"""Non-finite metrics survive the database and reach the report as they are, on both backends."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness.db import SUMMARY_METRICS, open_existing, utcnow
from harness.reports.render import build_report
from harness.results import trials_frame
from harness.spec import TrialConfig, load_study
from harness.study import RunOptions, run_study
from harness.train import TrialRecord

STUDY = """\
study: infinities
description: seeds whose metrics are infinite
dataset: synthetic
fixed:
  train_size: 64
  test_size: 32
  batch_size: 32
  epochs: 1
grid:
  method: [simclr, byol]
seeds: [0, 1]
"""


def infinite_trainer(
    config: TrialConfig, *, on_eval: Any = None, progress: bool | None = None, **_: Any
) -> TrialRecord:
    """simclr: final loss +inf on both seeds, alignment -inf on both; byol: one finite loss and
    one +inf, uniformity NaN on one seed."""
    summary: dict[str, float | None] = dict.fromkeys(SUMMARY_METRICS)
    summary["knn_top1"] = 0.5 + 0.1 * config.seed
    if config.method == "simclr":
        summary.update(final_loss=math.inf, alignment=-math.inf, uniformity=-1.5)
    else:
        summary.update(final_loss=2.0 if config.seed == 0 else math.inf, alignment=0.5)
        summary["uniformity"] = -2.0 if config.seed == 0 else math.nan
    return TrialRecord("complete", None, summary, [(1.0, 1, "loss", math.inf)], {}, utcnow(), utcnow())


def test_report__infinite_metrics_show_as_inf_on_both_backends(database_url: str, tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    run_study(load_study(path), RunOptions(db=database_url), run_trial=infinite_trainer, echo=lambda _: None)
    frame = trials_frame(database_url, "infinities").set_index(["method", "seed"])
    assert frame.loc[("simclr", 0), "final_loss"] == math.inf
    assert frame.loc[("simclr", 1), "alignment"] == -math.inf
    assert frame.loc[("byol", 1), "final_loss"] == math.inf
    out = build_report(open_existing(database_url), "infinities", tmp_path / "report")
    lines = (out / "report.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| configuration |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {
        cells[0]: dict(zip(columns, cells))
        for cells in ([c.strip().strip("*") for c in line.strip("|").split("|")] for line in lines)
        if cells[0] in ("simclr", "byol")
    }
    assert rows["simclr"]["final loss"] == "inf" and rows["simclr"]["alignment"] == "-inf"
    assert rows["byol"]["final loss"] == "2.000 (1 inf)"
    assert rows["byol"]["uniformity"] == "-2.000 (1 nan)"
