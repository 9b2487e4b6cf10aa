"""Reports built from fixture databases (tests/report_fixtures.py): a grid with baselines, a
diverged and a failed trial; a single-seed ablation with a pruned trial; a search with its Optuna
study; a study that has not started; and kernel benchmark runs."""

from __future__ import annotations

import argparse
import filecmp
import html
import math
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from scipy import stats as scipy_stats
from sqlalchemy import select

from harness.db import Database, StudyRow, TrialRow
from harness.reports import UnknownStudyError, build_all, build_report
from harness.reports import cli as report_cli
from harness.reports.data import accuracy_factor, load
from harness.reports.plots import pareto_front
from harness.reports.style import format_number, method_colour
from harness.reports.tables import comparison_frame, comparison_table
from harness.spec import METHOD_NAMES, parse_study

sys.path.insert(0, str(Path(__file__).parent))
import report_fixtures as fx

REPO = Path(__file__).resolve().parent.parent
STUDIES = ("lr-search", "method-grid", "moco-ablation", "not-started")


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Database:
    return fx.make_database(tmp_path_factory.mktemp("db") / "harness.db")


@pytest.fixture(scope="module")
def reports(database: Database, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reports")
    build_all(database, root)
    return root


def _markdown(reports: Path, study: str) -> str:
    return (reports / study / "report.md").read_text()


def _html(reports: Path, study: str) -> str:
    return (reports / study / "index.html").read_text()


def _md_rows(markdown: str) -> dict[str, list[str]]:
    """The first comparison-table row of each configuration label: its cells, markup removed."""
    section = markdown.split("## Comparison", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| ---") and not line.startswith("| configuration"):
            cells = [c.strip().strip("*") for c in line.strip("|").split(" | ")]
            rows.setdefault(cells[0], cells[1:])
    return rows


def _md_cells(markdown: str) -> list[str]:
    cells = []
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells += [c.strip().strip("*").replace("\\|", "|") for c in line.strip().strip("|").split(" | ")]
    return cells


def _html_cells(page: str) -> list[str]:
    cells = re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", page, flags=re.S)
    return [html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in cells]


def _db_trials(database: Database, study: str) -> list[TrialRow]:
    def query(session: object) -> list[TrialRow]:
        statement = select(TrialRow).join(StudyRow).where(StudyRow.name == study).order_by(TrialRow.id)
        return list(session.scalars(statement))  # type: ignore[attr-defined]

    return database.run(query)


# ---------------------------------------------------------------------------------------------
# Package hygiene


def test_import__pulls_in_no_torch() -> None:
    code = "import harness.reports, harness.reports.cli, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# The comparison table


def test_comparison_table__values_match_database(database: Database, reports: Path) -> None:
    rows = _md_rows(_markdown(reports, "method-grid"))
    data = load(database, "method-grid")
    by_hash: dict[str, list[TrialRow]] = defaultdict(list)
    for trial in _db_trials(database, "method-grid"):
        if trial.status == "complete":
            by_hash[trial.config_hash].append(trial)
    labels = data.complete.drop_duplicates("group").set_index("group")["label"]
    assert len(rows) == len(by_hash)
    for digest, trials in by_hash.items():
        cells = rows[labels[digest]]
        assert cells[0] == str(len(trials))
        knn = [100 * t.knn_top1 for t in trials]
        expected = f"{statistics.mean(knn):.1f}"
        if len(knn) > 1:  # the half-width of the 95% t-interval
            half = scipy_stats.t.ppf(0.975, len(knn) - 1) * statistics.stdev(knn) / math.sqrt(len(knn))
            expected += f" ± {half:.1f}"
        assert cells[1] == expected
        throughput = [t.train_img_per_s for t in trials if t.train_img_per_s is not None]
        if throughput:
            assert cells[8].startswith(format_number(statistics.mean(throughput), 0))
        memory = [t.peak_mem_bytes / 2**20 for t in trials if t.peak_mem_bytes is not None]
        if memory:
            assert cells[9].startswith(f"{statistics.mean(memory):.1f}")


def test_comparison_frame__means_and_stds_equal_database(database: Database) -> None:
    frame = comparison_frame(load(database, "method-grid")).set_index("group")
    for digest, trials in _group(_db_trials(database, "method-grid")).items():
        for column in ("linear_top1", "uniformity", "train_seconds"):
            values = [getattr(t, column) for t in trials]
            scale = 100.0 if column == "linear_top1" else 1.0
            assert frame.loc[digest, f"{column}_mean"] == pytest.approx(scale * statistics.mean(values))
            if len(values) > 1:
                assert frame.loc[digest, f"{column}_std"] == pytest.approx(scale * statistics.stdev(values))


def _group(trials: list[TrialRow]) -> dict[str, list[TrialRow]]:
    groups: dict[str, list[TrialRow]] = defaultdict(list)
    for trial in trials:
        if trial.status == "complete":
            groups[trial.config_hash].append(trial)
    return groups


def test_comparison_table__best_and_ties_bold_in_each_column(database: Database, reports: Path) -> None:
    """Bold: the best mean and the configurations a paired t-test over shared seeds cannot tell from
    it (p >= 0.05), checked against scipy on the database's own per-seed values."""
    markdown = _markdown(reports, "method-grid")
    section = markdown.split("## Comparison", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = lines[0], lines[1:]
    assert "k-NN top-1 (%)" in header
    regular = [line for line in body if not line.startswith("| *")]
    bold = {line.split(" | ")[0].strip("| ") for line in regular if line.split(" | ")[2].startswith("**")}
    groups = _group(_db_trials(database, "method-grid"))
    data = load(database, "method-grid")
    labels = data.complete.drop_duplicates("group").set_index("group")["label"]
    knn = {
        str(labels[digest]): {t.seed: 100 * t.knn_top1 for t in trials}
        for digest, trials in groups.items()
        if trials[0].config["method"] not in ("random_init", "supervised")
    }
    means = {label: statistics.mean(v.values()) for label, v in knn.items()}
    best = max(means, key=means.__getitem__)
    expected = {best}
    for label, values in knn.items():
        shared = sorted(set(values) & set(knn[best]))
        if label != best and len(shared) >= 2:
            p = scipy_stats.ttest_rel([values[s] for s in shared], [knn[best][s] for s in shared]).pvalue
            if p >= 0.05 or f"{means[label]:.1f}" == f"{means[best]:.1f}":
                expected.add(label)
    assert bold == expected and len(bold) < len(regular)


def test_comparison_table__baselines_are_reference_rows(reports: Path) -> None:
    rows = list(_md_rows(_markdown(reports, "method-grid")))
    references = [r for r in rows if r.startswith(("random_init", "supervised"))]
    assert references and rows[-len(references) :] == references
    markdown = _markdown(reports, "method-grid")
    for line in markdown.splitlines():
        if line.startswith("| *supervised"):
            assert "**" not in line, "a baseline must not be marked best"
    assert 'class="reference first-reference"' in _html(reports, "method-grid")


def test_comparison_table__diverged_seed_shown_as_nan(reports: Path) -> None:
    rows = _md_rows(_markdown(reports, "method-grid"))
    diverged = rows["simclr · temperature=0.1, batch_size=256"]
    assert diverged[4].endswith("(1 nan)")  # final loss: two finite seeds and a NaN


def test_comparison_table__unrecorded_columns_dropped_and_named(tmp_path: Path) -> None:
    db = Database(tmp_path / "no-probe.db")
    study_id = fx._add_study(db, fx.EMPTY_TEXT, fx.T0)
    for index, config in enumerate(parse_study(fx.EMPTY_TEXT).trials()):
        summary = {**fx._summary(config, 0), "linear_top1": None, "linear_top5": None}
        fx._add_trial(db, study_id, config, index, summary=summary, curves=False)
    data = load(db, "not-started")
    table, missing = comparison_table(comparison_frame(data))
    assert [m.column for m in missing] == ["linear_top1", "linear_top5"]
    assert "linear top-1 (%)" not in table.columns and "k-NN top-1 (%)" in table.columns


def test_comparison_table__single_seed_has_no_spread(reports: Path) -> None:
    rows = _md_rows(_markdown(reports, "moco-ablation"))
    assert rows and all(cells[0] == "1" for cells in rows.values())
    assert not any("±" in cell for cells in rows.values() for cell in cells)


def test_comparison_table__protocol_stated_above(reports: Path) -> None:
    markdown = _markdown(reports, "method-grid")
    section = markdown.split("## Comparison", 1)[1]
    protocol = section.index("Evaluation protocol")
    assert protocol < section.index("| configuration")
    assert "k = 20" in section and "T = 0.1" in section and "10 epochs" in section
    assert "1024 training images and 256 test images" in section


def test_comparison_table__ablation_rows_named_by_their_change(reports: Path) -> None:
    rows = list(_md_rows(_markdown(reports, "moco-ablation")))
    assert rows[0] == "moco · base"
    assert "moco · queue_size=16384" in rows and "moco · temperature=0.05" in rows
    assert "Base point of moco: temperature=0.2, queue_size=1024, aug_strength=1" in _markdown(
        reports, "moco-ablation"
    )


# ---------------------------------------------------------------------------------------------
# Markdown and HTML, figures


@pytest.mark.parametrize("study", STUDIES)
def test_markdown__carries_the_html_numbers(reports: Path, study: str) -> None:
    assert _md_cells(_markdown(reports, study)) == _html_cells(_html(reports, study))


@pytest.mark.parametrize("study", STUDIES)
def test_html__every_referenced_image_exists(reports: Path, study: str) -> None:
    page = _html(reports, study)
    sources = re.findall(r'<img src="([^"]+)"', page)
    for source in sources:
        assert (reports / study / source).is_file(), source
    on_disk = {f"figures/{p.name}" for p in (reports / study / "figures").glob("*")} if sources else set()
    assert on_disk == set(sources), "every figure written is referenced once"
    assert set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", _markdown(reports, study))) == set(sources)


def test_report__grid_has_every_section_and_figure(reports: Path) -> None:
    markdown = _markdown(reports, "method-grid")
    for heading in (
        "## Comparison",
        "## Ablations",
        "### temperature",
        "### batch_size",
        "## Training curves",
        "## Accuracy, throughput and memory",
        "## Failed and pruned trials",
        "## Provenance",
        "## Kernel benchmarks",
    ):
        assert heading in markdown
    figures = {p.name for p in (reports / "method-grid" / "figures").iterdir()}
    assert {
        "ablation_temperature.svg",
        "ablation_batch_size.svg",
        "curves_loss.svg",
        "curves_knn.svg",
        "pareto_throughput.svg",
        "memory_batch_size.svg",
        "bench_trend.svg",
    } <= figures


def test_figures__one_colour_per_method_everywhere(reports: Path) -> None:
    simclr, moco = method_colour("simclr"), method_colour("moco")
    for name in (
        "ablation_temperature.svg",
        "curves_knn.svg",
        "pareto_throughput.svg",
        "memory_batch_size.svg",
    ):
        svg = (reports / "method-grid" / "figures" / name).read_text()
        assert simclr in svg and moco in svg, name
    assert (
        method_colour("supervised") in (reports / "method-grid" / "figures" / "curves_loss.svg").read_text()
    )


def test_figures__axes_labelled_with_units(reports: Path) -> None:
    ablation = (reports / "method-grid" / "figures" / "ablation_batch_size.svg").read_text()
    assert "batch size (images)" in ablation and "k-NN top-1 (%)" in ablation
    assert (
        "training throughput (img/s)"
        in (reports / "method-grid" / "figures" / "pareto_throughput.svg").read_text()
    )
    assert "peak memory (MiB)" in (reports / "method-grid" / "figures" / "memory_batch_size.svg").read_text()


def test_report__deterministic_for_the_same_database(
    database: Database, reports: Path, tmp_path: Path
) -> None:
    # The search: its fANOVA importances are the part most likely to vary between builds.
    again = build_report(database, "lr-search", tmp_path / "again")
    first = reports / "lr-search"
    names = sorted(str(p.relative_to(first)) for p in first.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    _match, mismatch, errors = filecmp.cmpfiles(first, again, names, shallow=False)
    assert not mismatch and not errors


def test_report__rebuild_removes_stale_figures(database: Database, tmp_path: Path) -> None:
    out = tmp_path / "not-started"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "old.svg").write_text("<svg/>")
    build_report(database, "not-started", out)
    assert not (out / "figures" / "old.svg").exists()


# ---------------------------------------------------------------------------------------------
# Failures, provenance, benchmarks


def test_failures__failed_and_pruned_listed_with_reasons(reports: Path) -> None:
    grid = _markdown(reports, "method-grid").split("## Failed and pruned trials", 1)[1].split("\n## ", 1)[0]
    assert (
        "| moco · temperature=0.5, batch_size=256 | 1 | failed | 2 | RuntimeError: CUDA out of memory."
        in grid
    )
    ablation = (
        _markdown(reports, "moco-ablation").split("## Failed and pruned trials", 1)[1].split("\n## ", 1)[0]
    )
    assert "pruned at epoch 2" in ablation and "moco · aug_strength=0 | 0 | pruned" in ablation


def test_provenance__commits_devices_versions_and_study_file(database: Database, reports: Path) -> None:
    section = _markdown(reports, "method-grid").split("## Provenance", 1)[1].split("\n## ", 1)[0]
    count = len(_db_trials(database, "method-grid"))
    assert f"| 3f2c9a1b7d4e | no | 2.4.1+cu124 | 12.4 | NVIDIA H100 80GB HBM3 | gpu-node-1 | {count} |" in section
    assert fx.GRID_TEXT.strip() in section


def test_bench__latest_run_table_and_saved_trend(reports: Path) -> None:
    section = _markdown(reports, "method-grid").split("## Kernel benchmarks", 1)[1]
    assert "Latest run `run-d`" in section
    table = [line for line in section.splitlines() if line.startswith("| nt_xent |") and "| fast |" in line]
    assert len(table) == 4  # two sizes x two directions, fast against reference
    assert "N=256" in table[0] and "N=1024" in table[2], "cases in natural order"
    assert "| kernel | baseline | fused-v1 | latest (unsaved) |" in section  # run-b was never saved
    ratio = float(table[0].split(" | ")[9].strip("*"))
    assert ratio == pytest.approx(0.45, rel=0.1)


# ---------------------------------------------------------------------------------------------
# Searches


def test_search__history_importances_and_best_trials(database: Database, reports: Path) -> None:
    markdown = _markdown(reports, "lr-search")
    assert "## Search" in markdown and "5 complete, 1 failed, 2 pruned" in markdown
    assert (reports / "lr-search" / "figures" / "search_history.svg").is_file()
    assert (reports / "lr-search" / "figures" / "search_importance.svg").is_file()
    importances = markdown.split("### Parameter importances", 1)[1].split("###", 1)[0]
    assert all(f"| {p} |" in importances for p in ("lr", "temperature", "method"))
    # 5 complete trials: shown, with the caveat below statistics.RELIABLE_IMPORTANCE_TRIALS (20).
    assert "Caveat: these importances come from 5 complete trials, fewer than 20" in importances
    best = markdown.split("### Best trials", 1)[1].split("\n## ", 1)[0]
    first = next(line for line in best.splitlines() if line.startswith("| 1 |")).split(" | ")
    complete = [t for t in _db_trials(database, "lr-search") if t.status == "complete"]
    winner = max(complete, key=lambda t: t.knn_top1)
    assert first[1] == str(winner.optuna_number) and first[2] == str(winner.id)
    assert first[3].strip("*") == f"{100 * winner.knn_top1:.1f}"


def test_search__importances_with_too_few_trials_say_so(tmp_path: Path) -> None:
    import matplotlib as mpl

    db = Database(tmp_path / "few.db")
    fx.fill_search(db, points=fx.SEARCH_POINTS[:1])
    settings = dict(mpl.rcParams)
    out = build_report(db, "lr-search", tmp_path / "report")
    assert dict(mpl.rcParams) == settings, "a build leaves matplotlib's global settings alone"
    markdown = (out / "report.md").read_text()
    assert "Parameter importances could not be computed from 1 complete trial(s)" in markdown
    assert "### Best trials" in markdown


def test_search__without_optuna_study_falls_back_to_trials(tmp_path: Path) -> None:
    db = Database(tmp_path / "no-optuna.db")
    fx.fill_search(db, with_optuna=False)
    markdown = (build_report(db, "lr-search", tmp_path / "report") / "report.md").read_text()
    assert "could not be read from the database" in markdown
    assert "the harness's trials" in markdown and "| 1 | 6 |" in markdown
    tables = db.run(
        lambda session: session.connection().exec_driver_sql("SELECT name FROM sqlite_master").fetchall()
    )
    assert ("studies",) not in tables, "reading the Optuna study creates none of its tables"


# ---------------------------------------------------------------------------------------------
# Edge cases, the index page, the command line


def test_report__study_with_no_finished_trial(reports: Path) -> None:
    markdown = _markdown(reports, "not-started")
    assert "No complete trial yet" in markdown and "2 pending" in markdown
    assert "no trial has ended" in markdown


def test_report__unknown_study_lists_known_ones(database: Database, tmp_path: Path) -> None:
    with pytest.raises(UnknownStudyError) as error:
        build_report(database, "nope", tmp_path)
    assert error.value.known == sorted(STUDIES)


def test_build_all__index_links_every_study(reports: Path) -> None:
    page = (reports / "index.html").read_text()
    links = re.findall(r'<a href="([^"]+/index\.html)">', page)
    assert sorted(links) == sorted(f"{s}/index.html" for s in STUDIES)
    assert all((reports / link).is_file() for link in links)
    assert (reports / "index.md").is_file()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="harness report")
    report_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli__unknown_study_exits_2_listing_known(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report_cli.main(_parse(["nope", "--db", database.url])) == 2
    error = capsys.readouterr().err
    assert "no study named 'nope'" in error and "method-grid" in error and "moco-ablation" in error


def test_cli__missing_database_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_cli.main(_parse(["x", "--db", str(tmp_path / "absent.db")])) == 2
    assert "no database" in capsys.readouterr().err
    assert not (tmp_path / "absent.db").exists()


def test_cli__database_without_harness_tables_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE unrelated (x INTEGER)").connection.close()
    assert report_cli.main(_parse(["--all", "--db", str(path)])) == 2
    assert "holds no harness tables" in capsys.readouterr().err
    tables = sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    assert tables == [("unrelated",)], "a report creates nothing in the database"


def test_cli__study_and_all_are_exclusive(database: Database) -> None:
    assert report_cli.main(_parse(["--db", database.url])) == 2
    assert report_cli.main(_parse(["method-grid", "--all", "--db", database.url])) == 2


def test_cli__writes_the_report(
    database: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report_cli.main(_parse(["not-started", "--db", database.url, "--out", str(tmp_path / "r")])) == 0
    assert (tmp_path / "r" / "index.html").is_file() and (tmp_path / "r" / "report.md").is_file()
    assert "wrote" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Units


def test_method_colour__stable_and_distinct() -> None:
    colours = [method_colour(m) for m in METHOD_NAMES]
    assert len(set(colours)) == len(colours)
    assert method_colour("simclr") == "#1f77b4"
    assert method_colour("new_method") == method_colour("new_method")


def test_format_number__non_finite_values() -> None:
    assert format_number(math.nan) == "nan"
    assert format_number(None) == "nan"
    assert format_number(math.inf) == "inf"
    assert format_number(-0.0001, 2) == "0.00"
    assert format_number(1234.5678) == "1235"


def test_pareto_front__keeps_only_undominated() -> None:
    points = [(100.0, 70.0, "a"), (200.0, 65.0, "b"), (150.0, 60.0, "c"), (50.0, 72.0, "d")]
    assert [p[2] for p in pareto_front(points)] == ["d", "a", "b"]


def test_accuracy_factor__fractions_and_percentages() -> None:
    import pandas as pd

    empty = pd.DataFrame(columns=["name", "value"])
    assert accuracy_factor(pd.DataFrame({"knn_top1": [0.71, 0.8]}), empty) == 100.0
    assert accuracy_factor(pd.DataFrame({"knn_top1": [71.0, 80.0]}), empty) == 1.0


def test_configuration_label__random_init_leaves_out_the_training_knobs_it_ignores() -> None:
    from harness.reports.data import configuration_label

    row = {"method": "random_init", "batch_size": 256, "lr": 0.001, "temperature": 0.5}
    assert configuration_label(row, ("batch_size", "lr")) == "random_init"
    trained = {**row, "method": "simclr"}
    assert configuration_label(trained, ("batch_size", "lr", "temperature")) == (
        "simclr · batch_size=256, lr=0.001, temperature=0.5"
    )


# ---------------------------------------------------------------------------------------------
# Polish: missing values, Pareto labels, baseline lines, wide tables


def test_comparison_table__a_baseline_without_loss_or_throughput_shows_a_dash(reports: Path) -> None:
    header = next(
        line for line in _markdown(reports, "method-grid").splitlines() if line.startswith("| configuration")
    )
    columns = [c.strip() for c in header.strip("|").split(" | ")][1:]
    cells = dict(zip(columns, _md_rows(_markdown(reports, "method-grid"))["random_init"]))
    for column in ("final loss", "throughput (img/s)", "peak memory (MiB)"):
        assert cells[column] == "—", column
    assert "nan" not in cells.values()
    assert "—: not produced by that configuration" in _markdown(reports, "method-grid")


def test_pareto_plot__long_labels_never_leave_the_figure(tmp_path: Path) -> None:
    import pandas as pd
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    from harness.reports.plots import pareto_plot
    from harness.reports.style import figure_style

    long = " · temperature=0.05, batch_size=1024, queue_size=65536, aug_strength=0.75"
    comparison = pd.DataFrame(
        {
            "label": [f"{m}{long}" for m in ("simclr", "moco", "byol")],
            "method": ["simclr", "moco", "byol"],
            "is_reference": [False, False, False],
            "knn_top1_mean": [71.0, 74.0, 69.0],
            "train_img_per_s_mean": [9000.0, 3000.0, 12000.0],
        }
    )
    with figure_style():
        figure, front, _ = pareto_plot(comparison)
        FigureCanvasAgg(figure).draw()
        renderer = figure.canvas.get_renderer()
        # Everything drawn (tick labels outside the view excluded), legend and numbers included.
        drawn = figure.get_tightbbox(renderer)
        page = figure.bbox_inches
        assert page.x0 - 0.01 <= drawn.x0 and drawn.x1 <= page.x1 + 0.01
        assert page.y0 - 0.01 <= drawn.y0 and drawn.y1 <= page.y1 + 0.01
        texts = [t for t in figure.findobj(Text) if t.get_visible() and t.get_text().strip()]
        bounds = figure.axes[0].bbox
        for text in figure.axes[0].texts:  # the front's marks stay inside the axes
            box = text.get_window_extent(renderer)
            assert bounds.x0 <= box.x0 and box.x1 <= bounds.x1, text.get_text()
            assert bounds.y0 <= box.y0 and box.y1 <= bounds.y1, text.get_text()
    shown = {t.get_text() for t in texts}
    assert not any(long in s for s in shown), "the figure carries numbers; the table the labels"
    assert {str(n) for n in range(1, len(front) + 1)} <= shown


def test_pareto_table__numbers_match_the_figure(reports: Path) -> None:
    section = _markdown(reports, "method-grid").split("## Accuracy, throughput and memory", 1)[1]
    table = section.split("\n| # ", 1)[1].split("\n\n", 1)[0]
    header, _, *rows = table.splitlines()
    assert header.startswith("| on the Pareto front | throughput (img/s) |")
    assert [int(line.split(" | ")[0].strip("| ")) for line in rows] == list(range(1, len(rows) + 1))


def test_knn_curves__untrained_baseline_is_a_horizontal_reference_line(database: Database) -> None:
    from harness.reports.plots import curve_groups, knn_curves

    data = load(database, "method-grid")
    figure = knn_curves(data, curve_groups(data, "knn_top1"))
    ax = figure.axes[0]
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "random_init (untrained)"]
    xs, ys = line.get_xdata(), line.get_ydata()
    assert list(xs) == [0, 1] and ys[0] == ys[1]  # axes-wide, constant: an axhline
    complete = data.complete
    trial_ids = complete.loc[complete["method"] == "random_init", "trial_id"]
    metrics = data.metrics
    values = metrics[(metrics["name"] == "knn_top1") & metrics["trial_id"].isin(list(trial_ids))]["value"]
    assert ys[0] == pytest.approx(float(values.mean()))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "random_init (untrained)" in labels and "random_init" not in labels


def test_html__every_table_scrolls_inside_its_own_box(reports: Path) -> None:
    page = _html(reports, "method-grid")
    assert page.count("<table>") == page.count('<div class="table-wrap">\n<table>') > 0
    assert re.search(r"\.table-wrap \{[^}]*overflow-x: auto", page)


def test_metric_text__one_unit_for_accuracies_everywhere() -> None:
    from harness.reports.data import ACCURACY_COLUMNS
    from harness.units import ACCURACY_METRICS, metric_text

    assert ACCURACY_COLUMNS == ACCURACY_METRICS
    assert metric_text("knn_top1", 0.715) == "71.5%" and metric_text("linear_top5", 1.0) == "100.0%"
    assert metric_text("final_loss", 4.79612) == "4.796"
    assert metric_text("knn_top1", math.nan) == "nan" and metric_text("knn_top1", None) == "-"
