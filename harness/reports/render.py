"""Assemble a study's report (``report.md``, ``index.html`` and ``figures/*.svg``) and the index
page of every study. Reads the database only; writes nothing that depends on the time of the build."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from harness.db import Database
from harness.reports import evaluation_plots, plots, search, tables
from harness.reports.data import ReportData, ablation_base, load, reads_knob, study_names
from harness.reports.document import (
    Bullets,
    Cell,
    Code,
    Document,
    Heading,
    Image,
    Paragraph,
    Table,
    to_html,
    to_markdown,
)
from harness.reports.style import MISSING, figure_style, format_number, save_svg
from harness.results import as_database, bench_frame
from harness.spec import method_declarations

DEFAULT_OUT_ROOT = Path("reports")
FIGURES = "figures"
MARKDOWN_NAME = "report.md"
HTML_NAME = "index.html"


def build_report(db: Database | str | Path | None, study: str, out_dir: Path | None = None) -> Path:
    """Write ``out_dir`` (default ``reports/<study>``) with report.md, index.html and figures/;
    returns the folder. Raises ``UnknownStudyError`` (listing the known studies) for an unknown name."""
    database = as_database(db)
    data = load(database, study)
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT_ROOT / study
    _write_report(database, data, out)
    return out


def build_all(
    db: Database | str | Path | Sequence[Database | str | Path] | None, out_root: Path = DEFAULT_OUT_ROOT
) -> Path:
    """Render every study of the database (or of each database of a sequence) under
    ``out_root/<study>`` and an index page linking them; returns the index page
    (``out_root/index.html``, with ``index.md`` beside it)."""
    databases = [as_database(d) for d in db] if isinstance(db, (list, tuple)) else [as_database(db)]
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[Cell, ...]] = []
    benches = []
    for database in databases:
        bench = bench_frame(database)
        benches.append(bench)
        for name in study_names(database):
            data = load(database, name, bench=bench)
            _write_report(database, data, out_root / name)
            rows.append(_index_row(data))
    non_empty = [b for b in benches if not b.empty]
    bench = pd.concat(non_empty, ignore_index=True) if len(non_empty) > 1 else (non_empty or benches)[0]
    document = Document("Studies")
    document.add(
        Paragraph(
            f"{len(rows)} {'study' if len(rows) == 1 else 'studies'} in the database; each links to its report."
        ),
        Table(
            columns=(
                "study",
                "kind",
                "description",
                "complete",
                "failed",
                "pruned",
                "pending/running",
                "best k-NN top-1 (%)",
                "best configuration",
                "data as of",
            ),
            rows=tuple(rows),
            numeric=(False, False, False, True, True, True, True, True, False, False),
        ),
        Paragraph("Regenerate with `harness report --all` (one study: `harness report STUDY`)."),
    )
    bench_block = tables.bench_table(bench)
    if bench_block is not None:
        document.add(Heading("Kernel benchmarks (latest run)"), bench_block)
    (out_root / "index.md").write_text(to_markdown(document), encoding="utf-8")
    index = out_root / HTML_NAME
    index.write_text(to_html(document), encoding="utf-8")
    return index


def _write_report(database: Database, data: ReportData, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    figures_dir = out / FIGURES
    # A rebuild replaces the figures: one left from a former build would be referenced by nothing.
    if figures_dir.is_dir():
        for stale in sorted(figures_dir.glob("*.svg")):
            stale.unlink()
    with figure_style():
        document = _document(database, data, figures_dir)
    (out / MARKDOWN_NAME).write_text(to_markdown(document), encoding="utf-8")
    (out / HTML_NAME).write_text(to_html(document), encoding="utf-8")


def _index_row(data: ReportData) -> tuple[Cell, ...]:
    counts = tables.status_counts(data)
    comparison = tables.comparison_frame(data)
    best_text, best_label = MISSING, MISSING
    if not comparison.empty and "knn_top1_mean" in comparison.columns:
        # A configuration whose seeds all collapsed is not the study's best (tables.is_collapsed).
        collapsed = comparison.apply(tables.is_collapsed, axis=1).astype(bool)
        regular = comparison[
            ~comparison["is_reference"] & comparison["knn_top1_mean"].map(math.isfinite) & ~collapsed
        ]
        if not regular.empty:
            best = regular.sort_values(
                ["knn_top1_mean", "label"], ascending=[False, True], kind="stable"
            ).iloc[0]
            best_text, best_label = format_number(best["knn_top1_mean"], 1), str(best["label"])
    description = " ".join(data.info.description.split())
    return (
        Cell(data.info.name, href=f"{data.info.name}/{HTML_NAME}"),
        Cell(data.info.kind),
        Cell(description),
        Cell(str(counts.get("complete", 0))),
        Cell(str(counts.get("failed", 0))),
        Cell(str(counts.get("pruned", 0))),
        Cell(str(counts.get("pending", 0) + counts.get("running", 0))),
        Cell(best_text),
        Cell(best_label),
        Cell(_date(data.as_of)),
    )


def _date(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if hasattr(value, "strftime") else MISSING


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "figure"


class _Figures:
    """Saves figures under the report's figures/ folder and hands back their Image blocks."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def add(self, figure: Any, name: str, alt: str, caption: str = "") -> Image:
        filename = f"{_slug(name)}.svg"
        save_svg(figure, self.folder / filename)
        return Image(path=f"{FIGURES}/{filename}", alt=alt, caption=caption)


def _document(db: Database, data: ReportData, figures_dir: Path) -> Document:
    figures = _Figures(figures_dir)
    document = Document(f"Study report: {data.info.name}")
    _overview(document, data)
    comparison = tables.comparison_frame(data)
    _comparison(document, data, comparison)
    _evaluations(document, data, figures)
    summary = (
        search.summarize(db, data) if data.info.kind == "search" or (data.spec and data.spec.search) else None
    )
    _ablations(document, data, figures)
    _curves(document, data, figures)
    _efficiency(document, data, comparison, figures)
    if summary is not None:
        _search(document, data, summary, figures)
    _failures(document, data)
    _provenance(document, data)
    _benchmarks(document, data.bench, figures)
    return document


def _overview(document: Document, data: ReportData) -> None:
    if data.info.description:
        document.add(Paragraph(" ".join(data.info.description.split())))
    counts = tables.status_counts(data)
    status = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trials yet"
    items = [
        f"kind: {data.info.kind}",
        f"trials: {len(data.trials)} ({status})",
        f"varied knobs: {', '.join(data.swept) if data.swept else 'none'}",
        f"data as of: {_date(data.as_of)} "
        + (
            "(the latest trial end in the database)"
            if data.last_end is not None
            else "(study created; no trial has ended)"
        ),
    ]
    if data.spec is not None:
        items.insert(1, f"dataset: {data.spec.dataset}; seeds: {', '.join(str(s) for s in data.spec.seeds)}")
    if data.spec_error is not None:
        items.append(
            "the stored study file no longer parses; configuration labels use the configuration columns that vary"
        )
    document.add(Bullets(tuple(items)))


def _comparison(document: Document, data: ReportData, comparison: pd.DataFrame) -> None:
    document.add(Heading("Comparison"))
    if comparison.empty:
        document.add(Paragraph("No complete trial yet: nothing to compare."))
        return
    document.add(Paragraph(tables.protocol_text(data)))
    objective = tables.search_objective(data)
    limit = tables.SEARCH_TABLE_ROWS if objective is not None else None
    table, missing = tables.comparison_table(comparison, limit=limit)
    document.add(table)
    notes = [tables.statistics_note(comparison)]
    n_regular = int((~comparison["is_reference"]).sum())
    if objective is not None and n_regular > tables.SEARCH_TABLE_ROWS:
        notes.append(
            f"The {tables.SEARCH_TABLE_ROWS} best of {n_regular} configurations by {tables.metric_label(objective[0])}."
        )
    if data.info.kind == "ablate" and data.label_knobs:
        for method in data.methods:
            base = ablation_base(data.spec, method, data.label_knobs, data.trials)
            shown = [f"{k}={v}" for k, v in base.items() if reads_knob(method, k)]
            if shown:
                notes.append(f"Base point of {method}: {', '.join(shown)}; each other row changes one knob.")
    if table.reference_from is not None:
        notes.append(
            "Rows in italics below the line are the baselines (random_init, supervised): references, not candidates for best."
        )
    notes.append(
        "Directions: higher is better for accuracies, effective rank and throughput; lower is better for loss, "
        "alignment, uniformity, memory and time."
    )
    if missing:
        notes.append(
            f"No value in any trial (not recorded, or diverged to NaN): {', '.join(m.short for m in missing)}."
        )
    if any(cell.text == MISSING for row in table.rows for cell in row):
        notes.append(
            f"{MISSING}: not produced by that configuration (an untrained baseline has no training loss, "
            "throughput or memory) or not finite in any of its seeds."
        )
    document.add(Paragraph(" ".join(notes)))
    if "uses_labels" in comparison.columns and (comparison["uses_labels"] & ~comparison["is_reference"]).any():
        document.add(
            Paragraph(
                "Rows marked [labels] train with the labels (" + ", ".join(sorted(tables.label_methods())) + "): "
                "they are not self-supervised, and the best of a column is taken among the self-supervised rows."
            )
        )
    collapsed = tables.collapse_notes(comparison)
    if collapsed:
        document.add(
            Paragraph(
                "Collapsed representations (marked in the table; a configuration whose seeds all collapsed is "
                "never bold): " + " ".join(collapsed) + " Thresholds: harness/reports/collapse.py."
            )
        )
    shown, _ = tables.shown_metrics(comparison)
    significance = tables.significance_table(comparison, [m for m in shown if m.kind == "accuracy"])
    if significance is not None:
        document.add(Heading("Is the best distinguishable from the rest?", level=3), significance)


def _evaluations(document: Document, data: ReportData, figures: _Figures) -> None:
    """The evaluations of the saved encoders: label efficiency (linear beside fine-tune, and the
    figure), few-shot k-NN, transfer, the embedding pictures and failed evaluations."""
    if data.evaluations.empty:
        return
    document.add(Heading("Evaluations of the saved encoders"))
    protocol = tables.evaluation_protocol_text(data)
    if protocol:
        document.add(Paragraph(protocol))
    groups = plots.curve_groups(data, "knn_top1") if not data.complete.empty else {}
    several = data.complete.groupby("method")["group"].nunique().max() > 1 if not data.complete.empty else False
    chosen = (
        f" For each method its best configuration by k-NN top-1: {'; '.join(sorted(str(data.complete.loc[data.complete['group'] == g, 'label'].iloc[0]) for g in groups.values()))}."
        if several
        else ""
    )
    titles = {
        "label_efficiency": "Label efficiency",
        "few_shot": "Few-shot k-NN",
        "transfer": "Transfer",
    }
    for kind, title in titles.items():
        result = tables.evaluation_table(data, kind)
        if result is None:
            continue
        table, frame, columns = result
        document.add(Heading(title, level=3), table, Paragraph(tables.statistics_note(frame, short=True)))
        if kind == "label_efficiency":
            figure = evaluation_plots.label_efficiency_plot(data, groups)
            if figure is not None:
                document.add(
                    figures.add(
                        figure,
                        "label_efficiency",
                        "top-1 against the fraction of labels",
                        "Top-1 against the fraction of labeled training images (log axis): linear probe solid, "
                        "fine-tuning dashed; random_init fine-tuned is training from scratch on the same labels. "
                        "Means over seeds, error bars the 95% t-interval." + chosen,
                    )
                )
        significance = tables.significance_table(frame, [c.metric for c in columns])
        if significance is not None:
            document.add(significance)
    embedding = evaluation_plots.embedding_plot(data, groups)
    if embedding is not None:
        document.add(Heading("Embeddings", level=3))
        document.add(
            figures.add(
                embedding,
                "embeddings",
                "t-SNE maps of the test features per method",
                "t-SNE of each method's test features (class-balanced subset), coloured by class: separated colour "
                "groups mean an encoder that separates the classes without labels." + chosen,
            )
        )
    failures = tables.evaluation_failures_table(data)
    if failures is not None:
        document.add(Heading("Failed evaluations", level=3), failures)


def _ablations(document: Document, data: ReportData, figures: _Figures) -> None:
    ablation = plots.ablation_plots(data)
    if not ablation:
        return
    document.add(Heading("Searched knobs" if tables.search_objective(data) is not None else "Ablations"))
    for plot in ablation:
        document.add(Heading(f"{plot.knob}", level=3))
        document.add(
            figures.add(plot.figure, f"ablation_{plot.knob}", f"metrics against {plot.knob}", plot.caption)
        )


def _curves(document: Document, data: ReportData, figures: _Figures) -> None:
    if data.complete.empty or data.metrics.empty:
        return
    objective = tables.search_objective(data)
    ranking = objective[0] if objective is not None else "knn_top1"
    groups = plots.curve_groups(data, ranking)
    loss = plots.loss_curves(data, groups)
    knn = plots.knn_curves(data, groups)
    if loss is None and knn is None:
        return
    document.add(Heading("Training curves"))
    labels = data.complete.drop_duplicates("group").set_index("group")["label"]
    several = any(
        (data.complete["method"] == m).groupby(data.complete["group"]).any().sum() > 1 for m in groups
    )
    chosen = "; ".join(str(labels[g]) for g in groups.values())
    text = "Mean over seeds, band ± one standard deviation."
    if several:
        text += f" For each method, its best configuration by {tables.metric_label(ranking)}: {chosen}."
    document.add(Paragraph(text))
    if loss is not None:
        document.add(
            figures.add(
                loss,
                "curves_loss",
                "training loss per epoch",
                "Training loss per epoch, one panel per method (their objectives differ in scale).",
            )
        )
    if knn is not None:
        caption = "k-NN top-1 on the test split at each evaluation epoch."
        declared = method_declarations()
        untrained = sorted(m for m in groups if m in declared and not declared[m].trains)
        if untrained:
            caption += (
                f" Dotted horizontal line: {', '.join(untrained)}, the untrained encoder (its epoch-0 value), "
                "as the level training has to beat."
            )
        document.add(figures.add(knn, "curves_knn", "k-NN top-1 per epoch", caption))


def _efficiency(document: Document, data: ReportData, comparison: pd.DataFrame, figures: _Figures) -> None:
    pareto = plots.pareto_plot(comparison) if not comparison.empty else None
    memory = plots.memory_plot(data)
    if pareto is None and memory is None:
        return
    document.add(Heading("Accuracy, throughput and memory"))
    if pareto is not None:
        figure, front, column = pareto
        document.add(
            figures.add(
                figure,
                "pareto_throughput",
                "accuracy against throughput",
                f"Mean {tables.metric_label(column)} against mean training throughput per configuration; the dashed "
                "line and rings mark the Pareto front (no other configuration is both faster and more accurate), "
                "numbered as in the table below.",
            )
        )
        document.add(
            Table(
                columns=("#", "on the Pareto front", "throughput (img/s)", tables.metric_label(column)),
                rows=tuple(
                    (Cell(str(number)), Cell(label), Cell(format_number(x, 1)), Cell(format_number(y, 1)))
                    for number, (x, y, label) in enumerate(front, 1)
                ),
                numeric=(True, False, True, True),
            )
        )
    if memory is not None:
        document.add(
            figures.add(
                memory,
                "memory_batch_size",
                "peak memory against batch size",
                "Peak memory of training against batch size, per method: mean over the seeds (and any other varied "
                "knobs), error bars ± one standard deviation.",
            )
        )


def _search(document: Document, data: ReportData, summary: search.SearchSummary, figures: _Figures) -> None:
    document.add(Heading("Search"))
    objectives = summary.objectives or [(summary.metric, summary.maximize)]
    objective_text = " and ".join(
        f"{'maximize' if maximize else 'minimize'} {tables.metric_label(m)}" for m, maximize in objectives
    )
    states = summary.history["state"].value_counts() if not summary.history.empty else pd.Series(dtype=int)
    counted = ", ".join(f"{int(states[s])} {s}" for s in sorted(states.index))
    source = "the Optuna study of the same name" if summary.source == "optuna" else "the harness's trials"
    document.add(
        Paragraph(
            f"{'Objectives' if len(objectives) > 1 else 'Objective'}: {objective_text}. "
            f"Trials ({source}): {counted or 'none'}."
        )
    )
    history = plots.history_plot(summary)
    if history is not None:
        document.add(
            figures.add(
                history,
                "search_history",
                "optimization history",
                "Optimization history: each complete trial's objective, pruned trials at their last reported value, "
                "and the best so far.",
            )
        )
    if summary.multi_objective:
        _search_front(document, data, summary, figures)
    document.add(Heading("Parameter importances", level=3))
    importance = plots.importance_plot(summary)
    if importance is not None:
        document.add(
            figures.add(
                importance,
                "search_importance",
                "parameter importances",
                "fANOVA importances (seeded, normalized to sum 1).",
            )
        )
    importance_table = search.importance_table(summary)
    if importance_table is not None:
        document.add(importance_table)
    for note in summary.notes:
        document.add(Paragraph(note))
    document.add(Heading("Best trials", level=3))
    best = search.best_trials_table(summary, data)
    document.add(best if best is not None else Paragraph("No complete trial yet."))


def _search_front(document: Document, data: ReportData, summary: search.SearchSummary, figures: _Figures) -> None:
    names = " and ".join(
        f"{'maximize' if maximize else 'minimize'} {tables.metric_label(m)}" for m, maximize in summary.objectives
    )
    document.add(Heading("Pareto front", level=3))
    front = search.pareto_numbers(summary)
    document.add(
        Paragraph(
            f"A multi-objective search ({names}). The Pareto front: the complete trials that no other trial "
            f"matches or beats on every objective while beating them on one ({len(front)} of "
            f"{int((summary.history['state'] == 'complete').sum()) if not summary.history.empty else 0} complete). "
            "The history and the importances above and below are of the first objective."
        )
    )
    figure = plots.search_pareto_plot(summary, front)
    if figure is not None:
        document.add(
            figures.add(
                figure,
                "search_pareto",
                "Pareto front of the search",
                "Every complete trial at its first two objectives; the rings and dashed line mark the Pareto "
                "front, numbered with the Optuna trial numbers of the table below.",
            )
        )
    table = search.pareto_table(summary, data)
    document.add(table if table is not None else Paragraph("No complete trial with every objective yet."))


def _failures(document: Document, data: ReportData) -> None:
    document.add(Heading("Failed and pruned trials"))
    table = tables.failures_table(data)
    counts = tables.status_counts(data)
    unfinished = counts.get("pending", 0) + counts.get("running", 0)
    if table is None:
        document.add(Paragraph("None."))
    else:
        document.add(table)
    if unfinished:
        document.add(
            Paragraph(
                f"{counts.get('pending', 0)} pending and {counts.get('running', 0)} running trial(s) are not in the tables above."
            )
        )


def _provenance(document: Document, data: ReportData) -> None:
    document.add(Heading("Provenance"))
    table = tables.provenance_table(data)
    if table is not None:
        document.add(Paragraph("Where the trials ran (one row per commit, software and device):"), table)
    started = [t for t in data.trials.get("started_at", pd.Series(dtype=object)) if hasattr(t, "strftime")]
    ended = [t for t in data.trials.get("ended_at", pd.Series(dtype=object)) if hasattr(t, "strftime")]
    if started and ended:
        document.add(Paragraph(f"Trials ran from {_date(min(started))} to {_date(max(ended))}."))
    document.add(
        Paragraph(f"The study file (sha256 `{data.info.file_hash[:16]}`), as stored in the database:")
    )
    document.add(Code(data.info.file_text, "yaml"))


def _benchmarks(document: Document, bench: pd.DataFrame, figures: _Figures) -> None:
    document.add(Heading("Kernel benchmarks"))
    table = tables.bench_table(bench)
    if table is None:
        document.add(Paragraph("No `harness bench` run in this database."))
        return
    run = tables.latest_bench_run(bench)
    first = run.iloc[0]
    saved = f", saved as `{first['saved_as']}`" if isinstance(first["saved_as"], str) else ""
    commit = f", commit `{str(first['git_commit'])[:12]}`" if isinstance(first["git_commit"], str) else ""
    document.add(
        Paragraph(
            f"Latest run `{first['run_id']}` ({_date(first['created_at'])}{saved}{commit}) on "
            f"{', '.join(sorted({str(d) for d in run['device_name'].dropna()}) or sorted({str(d) for d in run['device']}))}."
        ),
        table,
    )
    trend = tables.bench_trend_frame(bench)
    trend_table = tables.bench_trend_table(trend)
    if trend_table is None:
        return
    document.add(Heading("Trend over saved runs", level=3))
    figure = plots.bench_trend_plot(trend)
    if figure is not None:
        document.add(
            figures.add(
                figure,
                "bench_trend",
                "kernel ratio trend",
                "Per kernel, the geometric mean over its cases of the time ratio to the reference, per saved run.",
            )
        )
    document.add(trend_table)
