"""The report's tables, computed from ``ReportData``: the comparison table (mean and 95% interval over
seeds, paired tests against the best), the evaluation protocol, the evaluations of saved encoders
(label efficiency, few-shot, transfer), failed and pruned trials, provenance and the kernel
benchmarks."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from harness.protocol_spec import HEAD_INITS, head_init_of
from harness.reports.collapse import collapse_reasons
from harness.reports.data import ReportData, group_order, plain_value
from harness.reports.document import Cell, Table
from harness.reports.statistics import (
    ALPHA,
    CONFIDENCE,
    INTERVAL_METHOD,
    TEST_METHOD,
    Interval,
    Verdict,
    compare_with_best,
    interval_text,
    p_value_text,
    t_interval,
)
from harness.reports.style import (
    METRICS,
    MIB,
    MISSING,
    TABLE_METRICS,
    Metric,
    format_knob_value,
    format_number,
    is_finite,
    metric_decimals,
)
from harness.spec import method_declarations

SEARCH_TABLE_ROWS = 20
REASON_CHARS = 300


def display_values(metric: Metric, values: pd.Series) -> list[float]:
    """A metric's values in the unit the report shows (MiB for bytes; accuracies are already in
    %); ±inf stay infinite (a loss that overflowed is a result), only missing values are NaN."""
    scale = 1.0 / MIB if metric.kind == "bytes" else 1.0
    return [float(v) * scale if not math.isnan(v) else math.nan for v in pd.to_numeric(values, errors="coerce")]


def comparison_frame(data: ReportData) -> pd.DataFrame:
    """One row per configuration of the complete trials: ``label``, ``method``, ``n`` (seeds),
    ``is_reference`` and, per table metric, ``<metric>_mean``, ``<metric>_std``, ``<metric>_low`` and
    ``<metric>_high`` (the 95% t-interval; NaN with one finite seed), ``<metric>_n`` (finite seeds),
    ``<metric>_nonfinite``, ``<metric>_verdict`` (best, tie, worse, untested; empty for baselines)
    and ``<metric>_p`` (the paired test against the best) in the report's units. Ordered by method then the varied knobs; a search
    is ordered by its objective, best first."""
    complete = data.complete
    records: list[dict[str, Any]] = []
    samples: dict[str, dict[str, dict[int, float]]] = {}  # metric -> group -> seed -> value
    if complete.empty:
        return pd.DataFrame(columns=["group", "label", "method", "n", "is_reference"])
    for group in group_order(complete):
        rows = complete[complete["group"] == group]
        first = rows.iloc[0]
        record: dict[str, Any] = {
            "group": group,
            "label": str(first["label"]),
            "method": str(first["method"]),
            "n": len(rows),
            "is_reference": bool(first["is_reference"]),
            # SupCon and supervised train with the labels: marked apart from the self-supervised rows.
            "uses_labels": str(first["method"]) in label_methods(),
            # Seeds whose representation collapsed, with why (harness.reports.collapse).
            "collapsed": [
                (int(row["seed"]), reasons) for _, row in rows.iterrows() if (reasons := collapse_reasons(row))
            ],
        }
        for knob in data.label_knobs:
            record[knob] = plain_value(first.get(knob))
        for metric in TABLE_METRICS:
            if metric.column not in rows.columns:
                continue
            values = display_values(metric, rows[metric.column])
            interval = t_interval(values)
            record[f"{metric.column}_mean"] = interval.mean
            record[f"{metric.column}_std"] = interval.std
            record[f"{metric.column}_low"] = interval.low
            record[f"{metric.column}_high"] = interval.high
            record[f"{metric.column}_n"] = interval.n
            record[f"{metric.column}_nonfinite"] = interval.n_nonfinite
            record[f"{metric.column}_inf"] = interval.n_inf
            record[f"{metric.column}_neg_inf"] = interval.n_neg_inf
            samples.setdefault(metric.column, {})[group] = dict(zip((int(s) for s in rows["seed"]), values))
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    add_verdicts(frame, samples, [m for m in TABLE_METRICS if m.column in samples])
    objective = search_objective(data)
    if objective is not None:
        column, maximize = objective
        key = f"{column}_mean"
        if key in frame.columns:
            ranked = frame[key].where(frame[key].map(math.isfinite), -math.inf if maximize else math.inf)
            order = sorted(
                range(len(frame)),
                key=lambda i: (
                    frame["is_reference"].iloc[i],
                    -ranked.iloc[i] if maximize else ranked.iloc[i],
                    i,
                ),
            )
            frame = frame.iloc[order].reset_index(drop=True)
    else:
        frame = frame.sort_values("is_reference", kind="stable").reset_index(drop=True)
    return frame


def add_verdicts(frame: pd.DataFrame, samples: dict[str, dict[str, dict[int, float]]], metrics: list[Metric]) -> None:
    """Per metric, ``<metric>_verdict`` and ``<metric>_p`` of each row against the best non-baseline
    row (a paired t-test over the seeds both have; ``statistics.compare_with_best``)."""
    if frame.empty:
        return
    candidates = [g for g, ref in zip(frame["group"], frame["is_reference"]) if not ref]
    for metric in metrics:
        verdicts = compare_with_best(
            samples[metric.column], higher_is_better=metric.higher_is_better, candidates=candidates
        )
        frame[f"{metric.column}_verdict"] = [verdicts.get(g, Verdict("")).status for g in frame["group"]]
        frame[f"{metric.column}_p"] = [
            verdicts[g].test.p_value if g in verdicts and verdicts[g].test is not None else math.nan  # type: ignore[union-attr]
            for g in frame["group"]
        ]
        frame[f"{metric.column}_shared"] = [
            verdicts[g].test.n if g in verdicts and verdicts[g].test is not None else 0  # type: ignore[union-attr]
            for g in frame["group"]
        ]
        frame[f"{metric.column}_difference"] = [
            verdicts[g].test.mean_difference if g in verdicts and verdicts[g].test is not None else math.nan  # type: ignore[union-attr]
            for g in frame["group"]
        ]


def search_objective(data: ReportData) -> tuple[str, bool] | None:
    """(metric column, maximize) of a search study; None for grids and ablations."""
    if data.spec is None or data.spec.search is None:
        return None
    return data.spec.search.metric, data.spec.search.direction == "maximize"


def shown_metrics(frame: pd.DataFrame) -> tuple[list[Metric], list[Metric]]:
    """(metrics with a value somewhere, finite or infinite; metrics without any). SQLite stores
    NaN as NULL, so a column with no value is one no trial recorded (or one where every trial
    diverged to NaN); the report names it rather than showing a column of 'nan'."""
    shown, missing = [], []
    for metric in TABLE_METRICS:
        key = f"{metric.column}_mean"
        has = key in frame.columns and any(not math.isnan(v) for v in frame[key])
        (shown if has else missing).append(metric)
    return shown, missing


def label_methods() -> frozenset[str]:
    """The methods whose declaration says they train with the labels."""
    return frozenset(name for name, spec in method_declarations().items() if spec.uses_labels)


def is_collapsed(record: pd.Series) -> bool:
    """Every seed of the configuration collapsed: flagged, and never the best of a column."""
    collapsed = record.get("collapsed")
    return isinstance(collapsed, list) and len(collapsed) == int(record["n"]) > 0


def best_values(frame: pd.DataFrame, metric: Metric) -> float:
    """The best mean of a column among the non-reference rows (baselines are references, not
    competitors) whose seeds did not all collapse; when the table has self-supervised rows, among
    those only (a method trained with labels is marked, not ranked against them); NaN when there is
    none."""
    key = f"{metric.column}_mean"
    eligible = [
        (record, v)
        for (_, record), v, ref in zip(frame.iterrows(), frame[key], frame["is_reference"])
        if not ref and math.isfinite(v) and not is_collapsed(record)
    ]
    self_supervised = [(r, v) for r, v in eligible if not r.get("uses_labels", False)]
    candidates = [v for _, v in (self_supervised or eligible)]
    # A lone candidate is not "best" of anything: bolding every cell of one row says nothing.
    if len(candidates) < 2:
        return math.nan
    return max(candidates) if metric.higher_is_better else min(candidates)


def _interval_of(record: pd.Series, column: str) -> Interval:
    return Interval(
        mean=float(record[f"{column}_mean"]),
        low=float(record.get(f"{column}_low", math.nan)),
        high=float(record.get(f"{column}_high", math.nan)),
        std=float(record.get(f"{column}_std", math.nan)),
        n=int(record.get(f"{column}_n", 0)),
        n_nonfinite=int(record.get(f"{column}_nonfinite", 0)),
        n_inf=int(record.get(f"{column}_inf", 0)),
        n_neg_inf=int(record.get(f"{column}_neg_inf", 0)),
    )


def _marked(record: pd.Series, column: str, best: float, digits: int) -> bool:
    """Bold: the best mean, a configuration the paired test cannot tell from it (a tie, not a
    loser), and a mean equal to the best at the precision shown (the reader cannot tell them apart)."""
    if record["is_reference"] or is_collapsed(record):
        return False
    mean = float(record[f"{column}_mean"])
    if not (math.isfinite(best) and math.isfinite(mean)):
        return False
    if record.get("uses_labels", False):
        # Not ranked against the self-supervised rows: bold only when it is the best shown (``best``
        # is taken among the self-supervised rows when there are any).
        return format_number(mean, digits) == format_number(best, digits)
    verdict = str(record.get(f"{column}_verdict", "") or "")
    return verdict in ("best", "tie") or format_number(mean, digits) == format_number(best, digits)


def comparison_table(frame: pd.DataFrame, limit: int | None = None) -> tuple[Table, list[Metric]]:
    """The comparison table and the metrics it leaves out because nothing recorded them."""
    shown, missing = shown_metrics(frame)
    if limit is not None:
        regular = frame[~frame["is_reference"]].head(limit)
        frame = pd.concat([regular, frame[frame["is_reference"]]], ignore_index=True)
    return metric_table(frame, shown), missing


def metric_table(frame: pd.DataFrame, metrics: list[Metric], caption: str = "", spread: bool = False) -> Table:
    """Rows of ``frame`` (label, n, is_reference and per metric the columns of
    :func:`interval_columns`) as 'mean ± half-width' cells, the best and its ties in bold, baselines
    below the rule. ``spread``: add '(draws sd x)' from ``<metric>_spread`` (few-shot draws)."""
    columns = ("configuration", "n", *(m.label for m in metrics))
    decimals = {m.column: metric_decimals(m, list(frame[f"{m.column}_mean"])) for m in metrics}
    best = {m.column: best_values(frame, m) for m in metrics}
    rows: list[tuple[Cell, ...]] = []
    for _, record in frame.iterrows():
        # Baselines are already set apart (reference rows); a label-using candidate (SupCon) is marked.
        labels_mark = " [labels]" if record.get("uses_labels", False) and not record["is_reference"] else ""
        cells = [Cell(str(record["label"]) + labels_mark + collapse_mark(record)), Cell(str(int(record["n"])))]
        for metric in metrics:
            digits = decimals[metric.column]
            text = interval_text(_interval_of(record, metric.column), digits)
            draws = float(record.get(f"{metric.column}_spread", math.nan))
            if spread and math.isfinite(draws) and text != MISSING:
                text += f" (draws sd {format_number(draws, digits)})"
            cells.append(Cell(text, bold=_marked(record, metric.column, best[metric.column], digits)))
        rows.append(tuple(cells))
    n_regular = int((~frame["is_reference"]).sum())
    reference_from = n_regular if n_regular < len(frame) else None
    return Table(
        columns=columns,
        rows=tuple(rows),
        numeric=(False, *([True] * (len(columns) - 1))),
        reference_from=reference_from,
        caption=caption,
    )


def statistics_note(frame: pd.DataFrame, short: bool = False) -> str:
    """What the ± and the bold cells mean, and, with one seed per configuration, that no interval
    exists; ``short`` refers to the comparison table's note instead of repeating it."""
    seeds = [int(n) for n in frame["n"]] if not frame.empty else []
    percent = round(100 * CONFIDENCE)
    if short and seeds and max(seeds) >= 2:
        text = f"Cells as in the comparison table: mean ± half-width of the {percent}% t-interval over seeds; bold: the best and its ties."
        return text + (" A configuration with one seed has no interval." if min(seeds) < 2 else "")
    if seeds and max(seeds) < 2:
        return (
            "Each configuration has one seed (n = 1): no confidence interval exists and no paired test can be "
            "made, so a cell is that seed's value and bold marks the best value only."
        )
    text = (
        f"Each cell is the mean over the seeds of one configuration ± the half-width of its {percent}% "
        f"confidence interval ({INTERVAL_METHOD}, n - 1 degrees of freedom; n = seeds with a finite value). "
        f"Bold: the best mean of the column and every configuration not distinguishable from it by a "
        f"{TEST_METHOD} over the seeds both share (p ≥ {ALPHA:.2f}): ties, not losers."
    )
    if seeds and min(seeds) < 2:
        text += " A configuration with one seed shows its value alone: no interval exists for it."
    return text


def significance_table(frame: pd.DataFrame, metrics: list[Metric]) -> Table | None:
    """For each metric, each non-baseline configuration against the column's best: shared seeds,
    mean difference, p of the paired test and the verdict. None when nothing could be tested."""
    rows: list[tuple[Cell, ...]] = []
    for metric in metrics:
        key = f"{metric.column}_verdict"
        if key not in frame.columns:
            continue
        column_rows = frame[frame[key].isin(["tie", "worse", "untested"])]
        if column_rows.empty or not (frame[key] == "best").any():
            continue
        best_labels = ", ".join(str(v) for v in frame.loc[frame[key] == "best", "label"])
        decimals = metric_decimals(metric, list(frame[f"{metric.column}_mean"]))
        for _, record in column_rows.iterrows():
            verdict = str(record[key])
            shared = int(record.get(f"{metric.column}_shared", 0))
            difference = float(record.get(f"{metric.column}_difference", math.nan))
            rows.append(
                (
                    Cell(metric.short),
                    Cell(str(record["label"])),
                    Cell(best_labels),
                    Cell(str(shared) if shared else "< 2"),
                    Cell(format_number(difference, decimals) if math.isfinite(difference) else "–"),
                    Cell(p_value_text(float(record.get(f"{metric.column}_p", math.nan)))),
                    Cell({"tie": "tie", "worse": "worse", "untested": "no test (< 2 shared seeds)"}[verdict], bold=verdict == "tie"),
                )
            )
    if not rows:
        return None
    return Table(
        columns=("metric", "configuration", "best", "shared seeds", "difference to best", "p", "verdict"),
        rows=tuple(rows),
        numeric=(False, False, False, True, True, True, False),
        caption=f"{TEST_METHOD} of each configuration against the best of the column over the seeds both "
        f"completed; tie: p ≥ {ALPHA:.2f}. Differences are in the column's unit (configuration − best).",
    )


def collapse_mark(record: pd.Series) -> str:
    """' (collapsed)' when every seed collapsed, ' (k of n collapsed)' when some did, else ''."""
    collapsed = record.get("collapsed")
    if not isinstance(collapsed, list) or not collapsed:
        return ""
    if is_collapsed(record):
        return " (collapsed)"
    return f" ({len(collapsed)} of {int(record['n'])} collapsed)"


def collapse_notes(frame: pd.DataFrame) -> list[str]:
    """One sentence per configuration with a collapsed seed: which seeds and why."""
    notes = []
    for _, record in frame.iterrows():
        collapsed = record.get("collapsed")
        if isinstance(collapsed, list) and collapsed:
            seeds = "; ".join(f"seed {seed}: {', '.join(reasons)}" for seed, reasons in collapsed)
            notes.append(f"{record['label']} collapsed ({seeds}).")
    return notes


def _values(trials: pd.DataFrame, column: str) -> list[Any]:
    if column not in trials.columns:
        return []
    values = {format_knob_value(plain_value(v)): plain_value(v) for v in trials[column]}
    return [
        values[k]
        for k in sorted(
            values,
            key=lambda k: (
                values[k] is None,
                str(type(values[k])),
                values[k] if values[k] is not None else 0,
            ),
        )
    ]


def _listing(values: list[Any], unit: str = "") -> str:
    if not values:
        return "unknown"
    texts = [format_knob_value(v) + (unit if v is not None else "") for v in values]
    return texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " or " + texts[-1]


def protocol_text(data: ReportData) -> str:
    """The evaluation protocol, stated above the table, from the trials' resolved configurations."""
    trials = data.trials
    k, t, probe = _values(trials, "knn_k"), _values(trials, "knn_t"), _values(trials, "linear_epochs")
    train, test = _values(trials, "train_size"), _values(trials, "test_size")

    def subset(values: list[Any], split: str) -> str:
        return (
            "; ".join(
                "the whole " + split + " split" if v is None else f"{format_knob_value(v)} {split} images"
                for v in values
            )
            or "unknown"
        )

    # Untrained baselines keep the default training knobs; their epochs are not the study's.
    trained = trials[~trials["method"].isin([n for n, m in method_declarations().items() if not m.trains])] if "method" in trials else trials
    dataset, backbone, epochs = (
        _values(trials, "dataset"),
        _values(trials, "backbone"),
        _values(trained if not trained.empty else trials, "epochs"),
    )
    return (
        f"Evaluation protocol: k-NN top-1 with k = {_listing(k)} neighbours and temperature T = {_listing(t)} "
        f"(cosine similarity, weighted vote); linear probe trained for {_listing(probe)} epochs on frozen, cached "
        f"features; {subset(train, 'training')} and {subset(test, 'test')}; dataset {_listing(dataset)}, backbone "
        f"{_listing(backbone)}, {_listing(epochs)} training epochs. {data_text(data)}"
    )


def _count(value: Any) -> str:
    return "whole split" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{int(value):,}"


def _stored_split(split: dict[str, Any], note: str = "") -> str:
    """One split of a trial's stored data: ``train (5,000)``, with ``note`` and a prepared shard's
    resolution and fingerprint."""
    shard = split.get("shard") or {}
    where = f", {shard['resolution']} px shard {str(shard.get('fingerprint', ''))[:12]}" if shard.get("resolution") else ""
    return f"{split['split']} ({int(split['images']):,}{note}{where})"


def _data_parts(row: pd.Series, methods: dict[str, Any]) -> tuple[str | None, str]:
    """(what the encoder pretrained on, what k-NN and the probe used) for one trial: from its
    stored data (``harness_trial.data``), else, for trials stored before it, its configuration."""
    spec = methods.get(str(row.get("method")))
    stored = row.get("data")
    labels = "labels used" if spec is not None and spec.uses_labels else "labels unused"
    if isinstance(stored, dict) and {"pretrain", "knn_probe_train", "knn_probe_test"} <= set(stored):
        pre, train, test = stored["pretrain"], stored["knn_probe_train"], stored["knn_probe_test"]
        pretrained = f"{pre['dataset']} {_stored_split(pre, f' images, {labels}')}"
        evaluated = f"{_stored_split(train)} / {_stored_split(test)}"
        classes = len(train.get("class_counts") or {})
        evaluated += f", {classes} classes" if classes else ""
    else:
        split = row.get("pretrain_split")
        split = "train" if not isinstance(split, str) else split  # before the knob existed: the train split
        size = _count(row.get("train_size"))
        each = " of each split" if "+" in split and size != "whole split" else ""
        images = f"{size} images{each}" if size != "whole split" else "whole split" + ("s" if "+" in split else "")
        pretrained = f"{row.get('dataset')} {split} ({images}, {labels})"
        evaluated = f"train ({_count(row.get('train_size'))}) / test ({_count(row.get('test_size'))})"
    trains = spec is None or spec.trains
    return (pretrained if trains else None), evaluated


def data_text(data: ReportData) -> str:
    """Which split pretrained the encoders and which ones k-NN and the linear probe used, with image
    counts: each distinct statement over the study's complete trials (all trials if none is)."""
    trials = data.complete if not data.complete.empty else data.trials
    if trials.empty:
        return ""
    methods = method_declarations()
    pretrained: list[str] = []
    evaluated: list[str] = []
    for _, row in trials.sort_values("trial_id").iterrows():
        pre, evaluation = _data_parts(row, methods)
        for part, seen in ((pre, pretrained), (evaluation, evaluated)):
            if part is not None and part not in seen:
                seen.append(part)
    first = f"pretrained on {' or '.join(pretrained)}" if pretrained else "no encoder trained (baselines only)"
    return f"Data: {first}; k-NN and linear probe on {' or '.join(evaluated)}."


def failures_table(data: ReportData) -> Table | None:
    trials = data.trials
    if trials.empty:
        return None
    bad = trials[trials["status"].isin(["failed", "pruned"])].sort_values("trial_id")
    if bad.empty:
        return None
    rows = []
    for _, row in bad.iterrows():
        reason = (
            str(row["reason"])
            if row.get("reason") is not None and not _is_nan(row.get("reason"))
            else "(no reason recorded)"
        )
        reason = " ".join(reason.split())
        if len(reason) > REASON_CHARS:
            reason = reason[: REASON_CHARS - 1] + "…"
        rows.append(
            (
                Cell(str(int(row["trial_id"]))),
                Cell(str(row["label"])),
                Cell(str(int(row["seed"]))),
                Cell(str(row["status"])),
                Cell(str(int(row["attempts"])) if is_finite(row.get("attempts")) else ""),
                Cell(reason),
            )
        )
    return Table(
        columns=("trial", "configuration", "seed", "status", "attempts", "reason"),
        rows=tuple(rows),
        numeric=(True, False, True, False, True, False),
    )


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def status_counts(data: ReportData) -> dict[str, int]:
    if data.trials.empty:
        return {}
    counts = data.trials["status"].value_counts()
    return {
        status: int(counts[status])
        for status in ("complete", "failed", "pruned", "running", "pending")
        if status in counts
    }


def provenance_table(data: ReportData) -> Table | None:
    """Where the trials ran: one row per (commit, dirty, torch, CUDA, device) with its trial count."""
    trials = data.trials
    if trials.empty:
        return None
    # Finished trials only: a running one may not have recorded its provenance yet.
    ran = trials[trials["status"].isin(["complete", "failed", "pruned"])]
    if ran.empty:
        return None
    keys = ("git_commit", "git_dirty", "torch_version", "cuda_version", "device_name", "host")
    counts: dict[tuple[str, ...], int] = {}
    for _, row in ran.iterrows():
        key = tuple(_text(row.get(k), k) for k in keys)
        counts[key] = counts.get(key, 0) + 1
    rows = tuple((*(Cell(v) for v in key), Cell(str(n))) for key, n in sorted(counts.items()))
    return Table(
        columns=("commit", "dirty", "torch", "CUDA", "device", "host", "trials"),
        rows=rows,
        numeric=(False, False, False, False, False, False, True),
    )


def _text(value: Any, key: str) -> str:
    if value is None or _is_nan(value):
        return MISSING
    if key == "git_commit":
        return str(value)[:12]
    if key == "git_dirty":
        return "yes" if bool(value) else "no"
    return str(value)


# ---------------------------------------------------------------------------------------------
# Kernel benchmarks


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort 'N=256' before 'N=1024': digit runs compare as numbers."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part)


def latest_bench_run(bench: pd.DataFrame) -> pd.DataFrame:
    """The rows of the most recent ``harness bench`` run (latest created_at, then highest id)."""
    if bench.empty:
        return bench
    last = bench.sort_values(["created_at", "id"], kind="stable").iloc[-1]
    return bench[bench["run_id"] == last["run_id"]]


def bench_table(bench: pd.DataFrame) -> Table | None:
    """The latest run: each implementation's median time next to the reference's, and the ratio
    (implementation / reference in the same run; below 1 = faster)."""
    run = latest_bench_run(bench)
    if run.empty:
        return None
    keys = ["kernel", "case", "direction", "dtype", "device"]
    reference = {
        tuple(row[k] for k in keys): float(row["median_s"])
        for _, row in run[run["impl"] == "reference"].iterrows()
    }
    others = run[run["impl"] != "reference"]
    ordered = sorted(
        others.iterrows(), key=lambda item: tuple(natural_key(str(item[1][k])) for k in [*keys, "impl"])
    )
    rows = []
    for _, row in ordered:
        ref = reference.get(tuple(row[k] for k in keys))
        ratio = row["ratio_to_reference"]
        if not is_finite(ratio) and ref:
            ratio = float(row["median_s"]) / ref
        rows.append(
            (
                Cell(str(row["kernel"])),
                Cell(str(row["case"])),
                Cell(str(row["direction"])),
                Cell(str(row["dtype"])),
                Cell(str(row["device"])),
                Cell(str(row["impl"])),
                Cell(format_number(ref * 1e3, 3) if ref else MISSING),
                Cell(format_number(float(row["median_s"]) * 1e3, 3)),
                Cell(format_number(float(row["iqr_s"]) * 1e3, 3) if is_finite(row["iqr_s"]) else MISSING),
                Cell(format_number(ratio, 3), bold=is_finite(ratio) and float(ratio) > 1.0),
                Cell(
                    format_number(1.0 / float(ratio), 2) + "×"
                    if is_finite(ratio) and float(ratio) > 0
                    else MISSING
                ),
            )
        )
    if not rows:
        return None
    return Table(
        columns=(
            "kernel",
            "case",
            "direction",
            "dtype",
            "device",
            "impl",
            "reference median (ms)",
            "median (ms)",
            "IQR (ms)",
            "ratio to reference",
            "speed-up",
        ),
        rows=tuple(rows),
        numeric=(False, False, False, False, False, False, True, True, True, True, True),
        caption="ratio = the median over interleaved rounds of (this round's time / the reference's time in "
        "the same round), so it can differ from the ratio of the two medians on a noisy machine (below 1 "
        "is faster); ratios above 1 (slower than the reference) are in bold.",
    )


def bench_trend_frame(bench: pd.DataFrame) -> pd.DataFrame:
    """Per kernel and run, the geometric mean over cases of the non-reference ratio, for the saved
    runs (oldest first) and the latest run when it is not saved: columns run, order, kernel, ratio."""
    if bench.empty:
        return pd.DataFrame(columns=["run", "order", "kernel", "ratio"])
    rows = bench[
        (bench["impl"] != "reference")
        & bench["ratio_to_reference"].map(lambda v: is_finite(v) and float(v) > 0)
    ]
    latest = latest_bench_run(bench)
    latest_id = latest["run_id"].iloc[0] if not latest.empty else None
    runs = rows[rows["saved_as"].notna() | (rows["run_id"] == latest_id)]
    if runs.empty:
        return pd.DataFrame(columns=["run", "order", "kernel", "ratio"])
    starts = runs.groupby("run_id")["created_at"].min().sort_values(kind="stable")
    ordered = sorted(starts.items(), key=lambda item: (item[1], str(item[0])))
    names: dict[str, str] = {}
    for run_id, started in ordered:
        saved = runs.loc[runs["run_id"] == run_id, "saved_as"].dropna()
        name = str(saved.iloc[0]) if not saved.empty else "latest (unsaved)"
        # A name saved twice (--save baseline again) keeps both runs apart by their date.
        if (
            name in names.values()
            or sum(1 for s in runs.drop_duplicates("run_id")["saved_as"] if s == name) > 1
        ):
            name = (
                f"{name} ({started:%Y-%m-%d %H:%M})" if hasattr(started, "strftime") else f"{name} ({run_id})"
            )
        names[run_id] = name
    records = []
    for order, (run_id, _) in enumerate(ordered):
        part = runs[runs["run_id"] == run_id]
        for kernel, ratios in sorted(part.groupby("kernel")["ratio_to_reference"]):
            values = [float(v) for v in ratios]
            records.append(
                {
                    "run": names[run_id],
                    "order": order,
                    "kernel": str(kernel),
                    "ratio": float(np.exp(np.mean(np.log(values)))),
                }
            )
    return pd.DataFrame.from_records(records)


def bench_trend_table(trend: pd.DataFrame) -> Table | None:
    if trend.empty:
        return None
    runs = [name for _, name in sorted({(o, r) for o, r in zip(trend["order"], trend["run"])})]
    kernels = sorted(trend["kernel"].unique())
    rows = []
    for kernel in kernels:
        part = trend[trend["kernel"] == kernel]
        values = {r: v for r, v in zip(part["run"], part["ratio"])}
        rows.append(
            (Cell(kernel), *(Cell(format_number(values[r], 3) if r in values else MISSING) for r in runs))
        )
    return Table(
        columns=("kernel", *runs),
        rows=tuple(rows),
        numeric=(False, *([True] * len(runs))),
        caption="geometric mean over the kernel's cases of the ratio to the reference, per run (oldest first).",
    )


def metric_label(column: str) -> str:
    return METRICS[column].label if column in METRICS else column


# ---------------------------------------------------------------------------------------------
# Evaluations of the saved encoders (harness evaluate): label efficiency, few-shot, transfer

PROTOCOL_LABELS: dict[str, str] = {
    "knn": "k-NN",
    "linear": "linear",
    "finetune": "fine-tune",
    "few_shot_knn": "k-NN",
    "embedding": "embedding",
}
_PROTOCOL_ORDER: tuple[str, ...] = ("knn", "linear", "finetune", "few_shot_knn", "embedding")
EVALUATION_KINDS: tuple[str, ...] = ("label_efficiency", "few_shot", "transfer")


@dataclass(frozen=True)
class EvaluationColumn:
    """One evaluation task as a table column (``metric.column`` is its key in the frame)."""

    task_hash: str
    protocol: str
    dataset: str
    fraction: float | None
    shots: int | None
    metric: Metric


def percent_text(fraction: float) -> str:
    """0.01 -> '1%', 0.001 -> '0.1%', 1 -> '100%'."""
    return f"{100 * fraction:.6g}%"


def evaluation_columns(evaluations: pd.DataFrame, kind: str) -> list[EvaluationColumn]:
    """The columns of one evaluation table: ``label_efficiency`` (linear and fine-tune on the
    study's dataset, per label fraction, linear beside fine-tune), ``few_shot`` (per shots) or
    ``transfer`` (per target dataset and protocol)."""
    if kind not in EVALUATION_KINDS:
        raise ValueError(f"unknown evaluation table {kind!r}; expected one of {', '.join(EVALUATION_KINDS)}")
    if evaluations.empty:
        return []
    evaluations = evaluations[evaluations["status"] == "complete"]
    own = ~evaluations["transfer"].astype(bool)
    if kind == "label_efficiency":
        rows = evaluations[own & evaluations["protocol"].isin(["linear", "finetune"])]
    elif kind == "few_shot":
        rows = evaluations[own & (evaluations["protocol"] == "few_shot_knn")]
    else:
        rows = evaluations[~own & evaluations["protocol"].isin(["knn", "linear", "finetune"])]
    tasks = rows.drop_duplicates("task_hash")

    def sort_key(row: pd.Series) -> tuple[Any, ...]:
        fraction = float(row["fraction"]) if is_finite(row["fraction"]) else math.inf
        shots = int(row["shots"]) if is_finite(row["shots"]) else 0
        return (str(row["dataset"]) if kind == "transfer" else "", fraction, shots,
                _PROTOCOL_ORDER.index(str(row["protocol"])), str(row["task_hash"]))

    ordered = sorted((row for _, row in tasks.iterrows()), key=sort_key)
    headers: list[str] = []
    for row in ordered:
        protocol = PROTOCOL_LABELS[str(row["protocol"])]
        if kind == "label_efficiency":
            headers.append(f"{protocol} · {percent_text(float(row['fraction']))} labels (%)")
        elif kind == "few_shot":
            headers.append(f"{int(row['shots'])}-shot k-NN (%)")
        else:
            headers.append(f"{row['dataset']} · {protocol} (%)")
    columns = []
    for index, (row, header) in enumerate(zip(ordered, headers)):
        # The same header twice: one task ran with other settings (the evaluate section changed).
        if headers.count(header) > 1:
            header = f"{header[:-4]} [{str(row['task_hash'])[:6]}] (%)"
        columns.append(
            EvaluationColumn(
                task_hash=str(row["task_hash"]),
                protocol=str(row["protocol"]),
                dataset=str(row["dataset"]),
                fraction=float(row["fraction"]) if is_finite(row["fraction"]) else None,
                shots=int(row["shots"]) if is_finite(row["shots"]) else None,
                metric=Metric(f"e{index}", header, True, "accuracy"),
            )
        )
    return columns


def evaluation_frame(data: ReportData, columns: list[EvaluationColumn]) -> pd.DataFrame:
    """One row per configuration with a complete evaluation in ``columns``: ``group``, ``label``,
    ``method``, ``n`` (seeds evaluated), ``is_reference`` and per column the interval, the verdict
    against the best (as :func:`comparison_frame`) and ``<key>_spread`` (mean std over draws)."""
    evaluations = data.evaluations
    if evaluations.empty or not columns:
        return pd.DataFrame(columns=["group", "label", "method", "n", "is_reference"])
    hashes = {c.task_hash for c in columns}
    done = evaluations[(evaluations["status"] == "complete") & evaluations["task_hash"].isin(hashes)]
    if done.empty:
        return pd.DataFrame(columns=["group", "label", "method", "n", "is_reference"])
    records: list[dict[str, Any]] = []
    samples: dict[str, dict[str, dict[int, float]]] = {}
    for group in group_order(done):
        rows = done[done["group"] == group]
        first = rows.iloc[0]
        record: dict[str, Any] = {
            "group": group,
            "label": str(first["label"]),
            "method": str(first["method"]),
            "n": int(rows["seed"].nunique()),
            "is_reference": bool(first["is_reference"]),
        }
        for column in columns:
            part = rows[rows["task_hash"] == column.task_hash]
            values = [float(v) if is_finite(v) else math.nan for v in part["top1"]]
            interval = t_interval(values)
            key = column.metric.column
            record.update(
                {
                    f"{key}_mean": interval.mean,
                    f"{key}_std": interval.std,
                    f"{key}_low": interval.low,
                    f"{key}_high": interval.high,
                    f"{key}_n": interval.n,
                    f"{key}_nonfinite": interval.n_nonfinite,
                }
            )
            spreads = [float(v) for v in part["spread"] if is_finite(v)]
            record[f"{key}_spread"] = float(np.mean(spreads)) if spreads else math.nan
            samples.setdefault(key, {})[group] = dict(zip((int(s) for s in part["seed"]), values))
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    frame = frame.sort_values("is_reference", kind="stable").reset_index(drop=True)
    add_verdicts(frame, samples, [c.metric for c in columns])
    return frame


def evaluation_table(data: ReportData, kind: str) -> tuple[Table, pd.DataFrame, list[EvaluationColumn]] | None:
    """The table of one kind of evaluation (see :func:`evaluation_columns`), its frame and
    columns; None when the study has no such evaluation."""
    columns = evaluation_columns(data.evaluations, kind)
    frame = evaluation_frame(data, columns)
    if frame.empty:
        return None
    columns = [c for c in columns if f"{c.metric.column}_mean" in frame.columns]
    return metric_table(frame, [c.metric for c in columns], spread=kind == "few_shot"), frame, columns


def evaluation_protocol_text(data: ReportData) -> str:
    """How the evaluations ran, from the tasks stored with them."""
    evaluations = data.evaluations
    if evaluations.empty:
        return ""
    parts: list[str] = []
    tasks = [t for t in evaluations.drop_duplicates("task_hash")["task"] if isinstance(t, dict)]
    seeds = sorted({int(t["label_seed"]) for t in tasks if t.get("label_seed") is not None})
    fine = [dict(t.get("settings", {})) for t in tasks if t.get("protocol") == "finetune"]
    if any(t.get("fraction") is not None for t in tasks):
        parts.append(
            "Label fractions are class-balanced draws from the whole labeled training split (independent of the "
            f"subset a trial pre-trained on), label seed {_listing(seeds)}; the same images for every configuration"
        )
    if fine:
        epochs = sorted({f.get("epochs") for f in fine if f.get("epochs") is not None})
        lrs = sorted({f.get("lr") for f in fine if f.get("lr") is not None})
        scales = sorted({f.get("backbone_lr_scale") for f in fine if f.get("backbone_lr_scale") is not None})
        starts = [text for h, text in HEAD_INITS.items() if h in {head_init_of(f) for f in fine}]
        parts.append(
            f"fine-tuning trains the whole encoder and a linear head for {_listing(epochs)} epochs (SGD, Nesterov "
            f"momentum 0.9, cosine decay, lr {_listing(lrs)} per 256 images for the head and {_listing(scales)} times "
            f"that for the pre-trained layers; the head starts {' or '.join(starts)}; random_init is trained from "
            "scratch at the full rate, from a zero head)"
        )
    if (evaluations["protocol"] == "linear").any():
        parts.append("the linear probe is the trial's own (Adam on frozen, cached, standardized features)")
    if (evaluations["protocol"] == "few_shot_knn").any():
        parts.append(
            "n-shot k-NN uses n labeled images per class as the only neighbours (every one votes, weighted by "
            "exp(cos / T)), averaged over independent draws; '(draws sd x)' is the mean standard deviation over draws"
        )
    adaptations = sorted(
        {f"{row['dataset']}: {row['details'].get('adaptation')}" for _, row in evaluations.iterrows()
         if bool(row["transfer"]) and isinstance(row["details"], dict) and row["details"].get("adaptation")}
    )
    if adaptations:
        parts.append("transfer inputs adapted as recorded (" + "; ".join(adaptations) + ")")
    return ("Evaluation protocols: " + "; ".join(parts) + ".") if parts else ""


def evaluation_failures_table(data: ReportData) -> Table | None:
    """Evaluations that failed, each with its trial, protocol and reason."""
    evaluations = data.evaluations
    if evaluations.empty:
        return None
    failed = evaluations[evaluations["status"] != "complete"]
    if failed.empty:
        return None
    rows = []
    for _, row in failed.sort_values(["trial_id", "evaluation_id"]).iterrows():
        reason = " ".join(str(row["reason"] or "(no reason recorded)").split())
        if len(reason) > REASON_CHARS:
            reason = reason[: REASON_CHARS - 1] + "…"
        rows.append(
            (
                Cell(str(int(row["trial_id"]))),
                Cell(str(row["label"])),
                Cell(str(int(row["seed"]))),
                Cell(f"{PROTOCOL_LABELS.get(str(row['protocol']), row['protocol'])} on {row['dataset']}"),
                Cell(reason),
            )
        )
    return Table(
        columns=("trial", "configuration", "seed", "evaluation", "reason"),
        rows=tuple(rows),
        numeric=(True, False, True, False, False),
    )
