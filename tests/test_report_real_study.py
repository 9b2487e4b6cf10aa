"""A report built from a database filled by a small real study (harness run, real trials)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from harness.reports import build_report
from harness.results import metrics_frame, trials_frame

REPO = Path(__file__).resolve().parent.parent

STUDY = """\
study: tiny-real
description: SimCLR against BYOL and the random-init floor on generated images
dataset: synthetic
fixed:
  train_size: 96
  test_size: 40
  batch_size: 32
  epochs: 2
  knn_k: 5
  linear_epochs: 3
  proj_hidden_dim: 32
  log_every: 1
grid:
  method: [simclr, byol, random_init]
seeds: [0, 1]
"""


@pytest.fixture(scope="module")
def real_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("real")
    study_file = folder / "tiny-real.yaml"
    study_file.write_text(STUDY)
    db = folder / "harness.db"
    run = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(study_file), "--db", str(db), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = build_report(db, "tiny-real", folder / "report")
    return db, out


def _row_cells(markdown: str, label: str) -> list[str]:
    section = markdown.split("## Comparison", 1)[1]
    for line in section.splitlines():
        cells = [c.strip().strip("*_") for c in line.strip().strip("|").split(" | ")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in the comparison table")


@pytest.mark.slow
def test_report__real_study_table_equals_the_database(real_study: tuple[Path, Path]) -> None:
    db, out = real_study
    trials = trials_frame(db, "tiny-real")
    assert len(trials) == 6 and set(trials["status"]) == {"complete"}
    markdown = (out / "report.md").read_text()
    for method, group in trials.groupby("method"):
        cells = _row_cells(markdown, method)
        assert cells[1] == str(len(group))
        # mean ± the half-width of the 95% Student t-interval over the seeds
        t = scipy_stats.t.ppf(0.975, len(group) - 1)
        knn = 100 * group["knn_top1"]
        assert cells[2] == f"{knn.mean():.1f} ± {t * knn.std(ddof=1) / len(group) ** 0.5:.1f}"
        linear = 100 * group["linear_top1"]
        assert cells[3] == f"{linear.mean():.1f} ± {t * linear.std(ddof=1) / len(group) ** 0.5:.1f}"


@pytest.mark.slow
def test_report__real_study_figures_exist_and_curves_are_recorded(real_study: tuple[Path, Path]) -> None:
    db, out = real_study
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources, "the report has figures"
    assert all((out / source).is_file() for source in sources)
    curves = metrics_frame(db, "tiny-real")
    trained = trials_frame(db, "tiny-real").query("method != 'random_init'")["trial_id"]
    for trial_id in trained:
        names = set(curves[curves["trial_id"] == trial_id]["name"])
        assert {"loss", "lr", "knn_top1"} <= names
