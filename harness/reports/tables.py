"""The report's tables, computed from ``ReportData``: the comparison table (mean ± std over seeds),
the evaluation protocol, failed and pruned trials, provenance and the kernel benchmarks."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from harness.reports.data import ReportData, group_order, plain_value
from harness.reports.document import Cell, Table
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
    """A metric's values in the unit the report shows (MiB for bytes; accuracies are already in %)."""
    scale = 1.0 / MIB if metric.kind == "bytes" else 1.0
    return [float(v) * scale if is_finite(v) else math.nan for v in pd.to_numeric(values, errors="coerce")]


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over the finite values of a configuration's seeds."""

    mean: float
    std: float
    n_finite: int
    n_nonfinite: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        finite = [v for v in values if math.isfinite(v)]
        mean = float(np.mean(finite)) if finite else math.nan
        std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
        return cls(mean, std, len(finite), len(values) - len(finite))


def stat_text(mean: float, std: float, n_nonfinite: int, decimals: int) -> str:
    """'mean ± std', the mean alone for a single seed, '(k nan)' for diverged seeds, MISSING ("—")
    when no seed has a finite value."""
    if not math.isfinite(mean):
        return MISSING
    text = format_number(mean, decimals)
    if math.isfinite(std):
        text += f" ± {format_number(std, decimals)}"
    if n_nonfinite:
        text += f" ({n_nonfinite} nan)"
    return text


def comparison_frame(data: ReportData) -> pd.DataFrame:
    """One row per configuration of the complete trials: ``label``, ``method``, ``n`` (seeds),
    ``is_reference`` and, per table metric, ``<metric>_mean``, ``<metric>_std``,
    ``<metric>_nonfinite`` in the report's units. Ordered by method then the varied knobs; a search
    is ordered by its objective, best first."""
    complete = data.complete
    records: list[dict[str, Any]] = []
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
        }
        for knob in data.label_knobs:
            record[knob] = plain_value(first.get(knob))
        for metric in TABLE_METRICS:
            if metric.column not in rows.columns:
                continue
            stat = Stat.of(display_values(metric, rows[metric.column]))
            record[f"{metric.column}_mean"] = stat.mean
            record[f"{metric.column}_std"] = stat.std
            record[f"{metric.column}_nonfinite"] = stat.n_nonfinite
        records.append(record)
    frame = pd.DataFrame.from_records(records)
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


def search_objective(data: ReportData) -> tuple[str, bool] | None:
    """(metric column, maximize) of a search study; None for grids and ablations."""
    if data.spec is None or data.spec.search is None:
        return None
    return data.spec.search.metric, data.spec.search.direction == "maximize"


def shown_metrics(frame: pd.DataFrame) -> tuple[list[Metric], list[Metric]]:
    """(metrics with a finite value somewhere, metrics without any). SQLite stores NaN as NULL,
    so a column with no finite value is one no trial recorded (or one where every trial
    diverged); the report names it rather than showing a column of 'nan'."""
    shown, missing = [], []
    for metric in TABLE_METRICS:
        key = f"{metric.column}_mean"
        has = key in frame.columns and any(math.isfinite(v) for v in frame[key])
        (shown if has else missing).append(metric)
    return shown, missing


def best_values(frame: pd.DataFrame, metric: Metric) -> float:
    """The best mean of a column among the non-reference rows (baselines are references, not
    competitors); NaN when there is none."""
    key = f"{metric.column}_mean"
    candidates = [v for v, ref in zip(frame[key], frame["is_reference"]) if not ref and math.isfinite(v)]
    # A lone candidate is not "best" of anything: bolding every cell of one row says nothing.
    if len(candidates) < 2:
        return math.nan
    return max(candidates) if metric.higher_is_better else min(candidates)


def comparison_table(frame: pd.DataFrame, limit: int | None = None) -> tuple[Table, list[Metric]]:
    """The comparison table and the metrics it leaves out because nothing recorded them."""
    shown, missing = shown_metrics(frame)
    if limit is not None:
        regular = frame[~frame["is_reference"]].head(limit)
        frame = pd.concat([regular, frame[frame["is_reference"]]], ignore_index=True)
    columns = ("configuration", "n", *(m.label for m in shown))
    decimals = {m.column: metric_decimals(m, list(frame[f"{m.column}_mean"])) for m in shown}
    best = {m.column: best_values(frame, m) for m in shown}
    rows: list[tuple[Cell, ...]] = []
    for _, record in frame.iterrows():
        cells = [Cell(str(record["label"])), Cell(str(int(record["n"])))]
        for metric in shown:
            mean = float(record[f"{metric.column}_mean"])
            std = float(record[f"{metric.column}_std"])
            digits = decimals[metric.column]
            # Ties at the shown precision are all marked: the reader cannot tell them apart.
            is_best = (
                not record["is_reference"]
                and math.isfinite(best[metric.column])
                and math.isfinite(mean)
                and format_number(mean, digits) == format_number(best[metric.column], digits)
            )
            text = stat_text(mean, std, int(record[f"{metric.column}_nonfinite"]), digits)
            cells.append(Cell(text, bold=is_best))
        rows.append(tuple(cells))
    n_regular = int((~frame["is_reference"]).sum())
    reference_from = n_regular if n_regular < len(frame) else None
    table = Table(
        columns=columns,
        rows=tuple(rows),
        numeric=(False, *([True] * (len(columns) - 1))),
        reference_from=reference_from,
    )
    return table, missing


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
        f"{_listing(backbone)}, {_listing(epochs)} training epochs. Each cell is the mean ± sample standard "
        "deviation over the seeds of one configuration (n = seeds that completed; a single seed shows no ±); "
        "the best value of each column is in bold."
    )


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
