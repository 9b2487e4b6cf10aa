"""The report's figures: seaborn on ``matplotlib.figure.Figure`` objects (no pyplot state), one
colour per method everywhere, units on every axis. Each function returns a Figure, or None when
the database holds nothing to draw."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

from harness.reports.data import ReportData, ablation_base, plain_value, reads_knob
from harness.reports.search import SearchSummary
from harness.reports.style import METRICS, MIB, format_knob_value, is_finite, method_colour, method_rank
from harness.reports.tables import display_values
from harness.spec import KNOBS, method_declarations

CURVE_POINTS = 200  # a loss curve longer than this is averaged into this many epoch bins
# What the ablation figures plot against each knob: the training objective and the accuracies.
ABLATION_PANELS: tuple[str, ...] = ("final_loss", "knn_top1", "linear_top1")


def knob_label(knob: str) -> str:
    """The knob's declared plot label (``harness.spec.KNOBS``); a column that is no knob (any more)
    is named with spaces for underscores."""
    return KNOBS[knob].plot_label if knob in KNOBS else knob.replace("_", " ")


def axis_label(column: str) -> str:
    if column == "final_loss":
        return "final training loss"
    return METRICS[column].label if column in METRICS else column


def _new_figure(
    width: float, height: float, ncols: int = 1, nrows: int = 1, **kwargs: Any
) -> tuple[Figure, Any]:
    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False, **kwargs)
    return figure, axes


def _numeric(values: list[Any]) -> bool:
    plain = [plain_value(v) for v in values]
    return (
        bool(plain)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in plain if v is not None)
        and any(v is not None for v in plain)
    )


def set_scale(
    ax: Any, values: list[float], axis: str = "x", *, force_log: bool = False, value_ticks: bool = False
) -> None:
    """A log axis where positive values span a decade or more (temperature, queue and batch sizes);
    symlog when a 0 sits among them (no queue). ``value_ticks`` puts the ticks on the values
    themselves (a grid's few designed values), else on 1-2-5 steps."""
    finite = sorted({float(v) for v in values if is_finite(v)})
    if not finite:
        return
    positive = [v for v in finite if v > 0]
    spans = len(positive) >= 2 and positive[-1] / positive[0] >= 10.0
    log = (spans or force_log) and bool(positive) and finite[0] >= 0
    target = ax.xaxis if axis == "x" else ax.yaxis
    if log:
        setter = ax.set_xscale if axis == "x" else ax.set_yscale
        if finite[0] == 0:
            setter("symlog", linthresh=positive[0])
        else:
            setter("log")
    if value_ticks and len(finite) <= 8:
        target.set_major_locator(FixedLocator(finite))
        target.set_minor_locator(NullLocator())
    elif log and finite[0] > 0:
        target.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        target.set_minor_locator(NullLocator())
    else:
        return
    target.set_major_formatter(FuncFormatter(lambda v, _pos: format_knob_value(float(v))))


def _legend_outside(ax: Any, title: str | None = None) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if handles:
        ax.legend(handles, labels, title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)


def _drop_legend(ax: Any) -> None:
    if ax.get_legend() is not None:
        ax.get_legend().remove()


def _hue_order(frame: pd.DataFrame) -> list[str]:
    return sorted({str(m) for m in frame["method"]}, key=method_rank)


# ---------------------------------------------------------------------------------------------
# Ablations


@dataclass(frozen=True)
class AblationPlot:
    knob: str
    figure: Figure
    caption: str


def _ablation_rows(data: ReportData, knob: str) -> tuple[pd.DataFrame, str | None]:
    """The complete trials that show the effect of ``knob``, and the style column (other varied
    knobs of a grid) if any. An ablation varies one knob at a time, so the rows where the other
    varied knobs sit at their base value."""
    complete = data.complete
    others = [k for k in data.label_knobs if k != knob and k in complete.columns]
    if data.info.kind == "ablate" and others:
        bases = {
            m: ablation_base(data.spec, str(m), tuple(others), data.trials)
            for m in complete["method"].unique()
        }
        keep = [
            all(
                not reads_knob(str(row["method"]), o)
                or format_knob_value(plain_value(row[o])) == bases[row["method"]].get(o)
                for o in others
            )
            for _, row in complete.iterrows()
        ]
        return complete[keep], None
    if data.info.kind == "grid" and others:
        # The legend titles the line styles by the column's name.
        column = ", ".join(others)
        frame = complete.copy()
        frame[column] = [
            ", ".join(
                f"{o}={format_knob_value(plain_value(row[o]))}"
                for o in others
                if reads_knob(str(row["method"]), o)
            )
            or "(not used)"
            for _, row in frame.iterrows()
        ]
        return frame, column
    return complete, None


def ablation_plots(data: ReportData) -> list[AblationPlot]:
    plots = []
    is_search = data.spec is not None and data.spec.search is not None
    for knob in data.label_knobs:
        if knob not in data.trials.columns:
            continue
        rows, style = _ablation_rows(data, knob)
        if rows.empty:
            continue
        panels = list(ABLATION_PANELS)
        if is_search and data.spec is not None and data.spec.search is not None:
            objective = data.spec.search.metric
            panels = [objective, *(p for p in panels if p != objective)]
        panels = [p for p in panels if p in rows.columns and any(is_finite(v) for v in rows[p])]
        if not panels:
            continue
        figure = _ablation_figure(rows, knob, panels, style, scatter=is_search, data=data)
        methods = ", ".join(_hue_order(rows))
        if is_search:
            caption = f"Each searched configuration's {', '.join(axis_label(p) for p in panels)} against {knob}, per method ({methods})."
        else:
            caption = (
                f"{', '.join(axis_label(p) for p in panels)} against {knob}: one line per method ({methods}), "
                "mean over seeds, error bars ± one standard deviation."
            )
            if data.info.kind == "ablate" and len(data.label_knobs) > 1:
                caption += " The other ablated knobs are at their base values."
            if style:
                caption += " Line style: the grid's other knobs."
            ignoring = sorted({m for m in rows["method"] if not reads_knob(str(m), knob)}, key=method_rank)
            if ignoring:
                caption += f" Dashed horizontal lines: methods that ignore {knob} ({', '.join(ignoring)})."
        plots.append(AblationPlot(knob, figure, caption))
    return plots


def _ablation_figure(
    rows: pd.DataFrame, knob: str, panels: list[str], style: str | None, *, scatter: bool, data: ReportData
) -> Figure:
    import seaborn as sns

    figure, axes = _new_figure(4.3 * len(panels) + 1.6, 3.6, ncols=len(panels))
    hue_order = _hue_order(rows)
    palette = {m: method_colour(m) for m in hue_order}
    values = [plain_value(v) for v in rows[knob]]
    numeric = _numeric(values)
    for index, column in enumerate(panels):
        ax = axes[0][index]
        frame = rows.copy()
        frame["y"] = (
            [v if math.isfinite(v) else np.nan for v in display_values(METRICS[column], frame[column])]
            if column in METRICS
            else pd.to_numeric(frame[column], errors="coerce")
        )
        frame = frame[frame["y"].notna()]
        if frame.empty:
            ax.set_visible(False)
            continue
        users = frame[frame["method"].map(lambda m: reads_knob(str(m), knob))]
        ignoring = frame[~frame["method"].map(lambda m: reads_knob(str(m), knob))]
        # Only the methods drawn as lines enter seaborn's legend; the others get a dashed line.
        drawn = [m for m in hue_order if m in set(users["method"])]
        if numeric:
            frame_x = users.assign(
                x=[float(plain_value(v)) if plain_value(v) is not None else np.nan for v in users[knob]]
            )
            frame_x = frame_x[frame_x["x"].notna()]
            if scatter:
                sns.scatterplot(
                    frame_x, x="x", y="y", hue="method", hue_order=drawn, palette=palette, ax=ax, s=36
                )
            elif not frame_x.empty:
                sns.lineplot(
                    frame_x.sort_values("x", kind="stable"),
                    x="x",
                    y="y",
                    hue="method",
                    hue_order=drawn,
                    palette=palette,
                    style=style,
                    errorbar="sd",
                    err_style="bars",
                    marker="o",
                    markersize=6,
                    ax=ax,
                )
            set_scale(
                ax, list(frame_x["x"]), "x", force_log=_searched_log(data, knob), value_ticks=not scatter
            )
        else:
            order = sorted({format_knob_value(plain_value(v)) for v in users[knob]})
            frame_x = users.assign(x=[format_knob_value(plain_value(v)) for v in users[knob]])
            if scatter:
                sns.stripplot(
                    frame_x,
                    x="x",
                    y="y",
                    hue="method",
                    hue_order=drawn,
                    palette=palette,
                    order=order,
                    ax=ax,
                    dodge=False,
                    jitter=False,
                )
            elif not frame_x.empty:
                sns.pointplot(
                    frame_x,
                    x="x",
                    y="y",
                    hue="method",
                    hue_order=drawn,
                    palette=palette,
                    order=order,
                    errorbar="sd",
                    dodge=0.3 if len(hue_order) > 1 else False,
                    ax=ax,
                    markersize=5,
                )
        for method, part in sorted(ignoring.groupby("method"), key=lambda item: method_rank(str(item[0]))):
            ax.axhline(
                float(part["y"].mean()),
                color=method_colour(str(method)),
                linestyle="--",
                linewidth=1.2,
                label=f"{method} (ignores {knob})",
            )
        ax.set_xlabel(knob_label(knob))
        ax.set_ylabel(axis_label(column))
        ax.set_title(axis_label(column).split(" (")[0])
    _shared_legend([a for a in axes[0] if a.get_visible()])
    return figure


def _shared_legend(axes: list[Any]) -> None:
    """One legend, outside the last panel, from the panel that draws the most (a method without
    a loss, such as random_init, is missing from the loss panel only)."""
    if not axes:
        return
    richest = max(axes, key=lambda a: (len(a.get_legend_handles_labels()[1]), -axes.index(a)))
    handles, labels = richest.get_legend_handles_labels()
    for ax in axes:
        _drop_legend(ax)
    if handles:
        axes[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)


def _searched_log(data: ReportData, knob: str) -> bool:
    if data.spec is None or data.spec.search is None:
        return False
    return any(p.name == knob and p.log for p in data.spec.search.space)


# ---------------------------------------------------------------------------------------------
# Training curves


def curve_groups(data: ReportData, ranking_column: str) -> dict[str, str]:
    """Per method, the configuration whose curves are drawn: the best mean of ``ranking_column``
    (the search objective or k-NN top-1); the only one when a method has one."""
    complete = data.complete
    chosen: dict[str, str] = {}
    higher = METRICS[ranking_column].higher_is_better if ranking_column in METRICS else True
    for method in sorted({str(m) for m in complete["method"]}, key=method_rank):
        part = complete[complete["method"] == method]
        scores = []
        for group, rows in part.groupby("group"):
            finite = [float(v) for v in rows.get(ranking_column, pd.Series(dtype=float)) if is_finite(v)]
            score = float(np.mean(finite)) if finite else -math.inf if higher else math.inf
            scores.append((-score if higher else score, str(rows["label"].iloc[0]), str(group)))
        chosen[method] = sorted(scores)[0][2]
    return chosen


def _curve_frame(data: ReportData, groups: dict[str, str], name: str) -> pd.DataFrame:
    metrics = data.metrics
    if metrics.empty:
        return pd.DataFrame(columns=["trial_id", "epoch", "value", "method"])
    trial_method = {}
    for method, group in groups.items():
        for trial_id in data.complete.loc[data.complete["group"] == group, "trial_id"]:
            trial_method[int(trial_id)] = method
    rows = metrics[(metrics["name"] == name) & metrics["trial_id"].isin(list(trial_method))].copy()
    rows["value"] = pd.to_numeric(rows["value"], errors="coerce")
    rows = rows[rows["value"].map(math.isfinite)]
    if rows.empty:
        return pd.DataFrame(columns=["trial_id", "epoch", "value", "method"])
    rows["method"] = rows["trial_id"].map(trial_method)
    frames = []
    for _trial, part in rows.groupby("trial_id", sort=True):
        if len(part) > CURVE_POINTS:
            top = float(part["epoch"].max()) or 1.0
            width = top / CURVE_POINTS
            part = part.assign(epoch=(np.floor(part["epoch"] / width) + 0.5) * width)
            part = part.groupby(["trial_id", "method", "epoch"], as_index=False)["value"].mean()
        frames.append(part[["trial_id", "epoch", "value", "method"]])
    return pd.concat(frames, ignore_index=True)


def loss_curves(data: ReportData, groups: dict[str, str]) -> Figure | None:
    """The training loss per epoch, one panel per method (the objectives have different scales)."""
    import seaborn as sns

    frame = _curve_frame(data, groups, "loss")
    if frame.empty:
        return None
    methods = _hue_order(frame)
    ncols = min(4, len(methods))
    nrows = math.ceil(len(methods) / ncols)
    figure, axes = _new_figure(3.4 * ncols, 2.7 * nrows, ncols=ncols, nrows=nrows)
    for index, method in enumerate(methods):
        ax = axes[index // ncols][index % ncols]
        part = frame[frame["method"] == method]
        sns.lineplot(
            part, x="epoch", y="value", color=method_colour(method), errorbar="sd", ax=ax, linewidth=1.4
        )
        ax.set_title(method, color=method_colour(method))
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        if part["value"].min() > 0 and part["value"].max() / part["value"].min() >= 100:
            ax.set_yscale("log")
    for index in range(len(methods), nrows * ncols):
        axes[index // ncols][index % ncols].set_visible(False)
    return figure


def knn_curves(data: ReportData, groups: dict[str, str]) -> Figure | None:
    """k-NN top-1 at each evaluation epoch, every method on one axis."""
    import seaborn as sns

    frame = _curve_frame(data, groups, "knn_top1")
    if frame.empty:
        return None
    # An untrained baseline has one point (epoch 0): a reference level for every epoch, drawn as
    # a horizontal line across the axes rather than a lone marker at the origin.
    untrained_methods = [name for name, declared in method_declarations().items() if not declared.trains]
    untrained = frame[frame["method"].isin(untrained_methods)]
    frame = frame[~frame["method"].isin(untrained_methods)]
    figure, axes = _new_figure(7.5, 4.0)
    ax = axes[0][0]
    for method, part in sorted(untrained.groupby("method"), key=lambda item: method_rank(str(item[0]))):
        ax.axhline(
            float(part["value"].mean()),
            color=method_colour(str(method)),
            linestyle=":",
            linewidth=1.6,
            label=f"{method} (untrained)",
            zorder=1,
        )
    if frame.empty:
        ax.set_xlim(0, 1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(METRICS["knn_top1"].label)
        _legend_outside(ax)
        return figure
    hue_order = _hue_order(frame)
    sns.lineplot(
        frame,
        x="epoch",
        y="value",
        hue="method",
        hue_order=hue_order,
        palette={m: method_colour(m) for m in hue_order},
        errorbar="sd",
        marker="o",
        markersize=4,
        ax=ax,
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel(METRICS["knn_top1"].label)
    _legend_outside(ax)
    return figure


# ---------------------------------------------------------------------------------------------
# Accuracy against throughput, memory against batch size


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The configurations no other beats on both throughput and accuracy (higher is better for
    both), by increasing throughput."""
    front = []
    best_accuracy = -math.inf
    for x, y, label in sorted(points, key=lambda p: (-p[0], -p[1], p[2])):
        if y > best_accuracy:
            front.append((x, y, label))
            best_accuracy = y
    return sorted(front)


def accuracy_column(frame: pd.DataFrame) -> str | None:
    for column in ("knn_top1", "linear_top1"):
        key = f"{column}_mean"
        if key in frame.columns and any(math.isfinite(v) for v in frame[key]):
            return column
    return None


def pareto_plot(comparison: pd.DataFrame) -> tuple[Figure, list[tuple[float, float, str]], str] | None:
    """Mean accuracy against mean throughput per configuration, the Pareto front marked."""
    import seaborn as sns

    column = accuracy_column(comparison)
    if column is None or "train_img_per_s_mean" not in comparison.columns:
        return None
    frame = comparison[
        comparison["train_img_per_s_mean"].map(math.isfinite)
        & comparison[f"{column}_mean"].map(math.isfinite)
    ].copy()
    frame = frame[frame["train_img_per_s_mean"] > 0]
    if frame.empty:
        return None
    frame["x"] = frame["train_img_per_s_mean"]
    frame["y"] = frame[f"{column}_mean"]
    hue_order = _hue_order(frame)
    figure, axes = _new_figure(8.0, 4.6)
    ax = axes[0][0]
    # Baselines are drawn for reference but, as in the table, are not candidates for the front.
    candidates = frame[~frame["is_reference"].astype(bool)]
    front = pareto_front(
        [
            (float(x), float(y), str(label))
            for x, y, label in zip(candidates["x"], candidates["y"], candidates["label"])
        ]
    )
    if len(front) > 1:
        ax.step(
            [p[0] for p in front],
            [p[1] for p in front],
            where="pre",
            color="#444444",
            linestyle="--",
            linewidth=1.0,
            label="Pareto front",
            zorder=1,
        )
    sns.scatterplot(
        frame,
        x="x",
        y="y",
        hue="method",
        hue_order=hue_order,
        palette={m: method_colour(m) for m in hue_order},
        s=60,
        ax=ax,
        zorder=2,
    )
    ax.scatter(
        [p[0] for p in front],
        [p[1] for p in front],
        s=150,
        facecolors="none",
        edgecolors="#222222",
        linewidths=1.3,
        zorder=3,
        label="on the front",
    )
    # Numbers, not configuration labels: a label can be longer than the axes are wide. The
    # table under the figure maps each number to its configuration.
    for number, (x, y, _label) in enumerate(front, 1):
        ax.annotate(
            str(number),
            (x, y),
            textcoords="offset points",
            xytext=(7, 6),
            fontsize=8,
            fontweight="bold",
            color="#222222",
            annotation_clip=False,
        )
    ax.margins(x=0.08, y=0.12)  # room for the rings and numbers at the extremes
    set_scale(ax, list(frame["x"]), "x")
    ax.set_xlabel("training throughput (img/s)")
    ax.set_ylabel(METRICS[column].label)
    _legend_outside(ax)
    return figure, front, column


def memory_plot(data: ReportData) -> Figure | None:
    """Peak memory against batch size, one line per method, error bars over seeds."""
    import seaborn as sns

    complete = data.complete
    if complete.empty or "peak_mem_bytes" not in complete.columns or "batch_size" not in complete.columns:
        return None
    frame = complete[complete["peak_mem_bytes"].map(is_finite) & complete["batch_size"].map(is_finite)].copy()
    frame = frame[frame["method"] != "random_init"]
    # One batch size makes no line: the comparison table already has each configuration's memory.
    if frame.empty or frame["batch_size"].nunique() < 2:
        return None
    frame["x"] = frame["batch_size"].astype(float)
    frame["y"] = frame["peak_mem_bytes"].astype(float) / MIB
    hue_order = _hue_order(frame)
    figure, axes = _new_figure(7.5, 4.0)
    ax = axes[0][0]
    sns.lineplot(
        frame.sort_values("x", kind="stable"),
        x="x",
        y="y",
        hue="method",
        hue_order=hue_order,
        palette={m: method_colour(m) for m in hue_order},
        errorbar="sd",
        err_style="bars",
        marker="o",
        ax=ax,
    )
    set_scale(ax, list(frame["x"]), "x", value_ticks=True)
    ax.set_xlabel(knob_label("batch_size"))
    ax.set_ylabel(METRICS["peak_mem_bytes"].label)
    _legend_outside(ax)
    return figure


# ---------------------------------------------------------------------------------------------
# Searches


def history_plot(summary: SearchSummary) -> Figure | None:
    history = summary.history
    if history.empty or not any(math.isfinite(v) for v in history["value"]):
        return None
    figure, axes = _new_figure(8.0, 4.0)
    ax = axes[0][0]
    complete = history[(history["state"] == "complete") & history["value"].map(math.isfinite)]
    pruned = history[(history["state"] == "pruned") & history["value"].map(math.isfinite)]
    if "param_method" in complete.columns:
        for method in sorted({str(m) for m in complete["param_method"].dropna()}, key=method_rank):
            part = complete[complete["param_method"] == method]
            ax.scatter(
                part["number"],
                part["value"],
                color=method_colour(method),
                s=30,
                label=f"complete: {method}",
                zorder=3,
            )
    else:
        ax.scatter(complete["number"], complete["value"], color="#1f77b4", s=30, label="complete", zorder=3)
    if not pruned.empty:
        ax.scatter(
            pruned["number"],
            pruned["value"],
            color="#999999",
            marker="x",
            s=30,
            label="pruned (last reported value)",
            zorder=2,
        )
    best = history[history["best"].map(math.isfinite)]
    if not best.empty:
        ax.step(
            best["number"],
            best["best"],
            where="post",
            color="#d62728",
            linewidth=1.5,
            label="best so far",
            zorder=4,
        )
    ax.set_xlabel("trial number")
    ax.set_ylabel(summary.axis_label)
    _legend_outside(ax)
    return figure


def search_pareto_plot(summary: SearchSummary, front: list[int]) -> Figure | None:
    """A multi-objective search: every complete trial at its first two objectives, the Pareto
    front ringed, joined and numbered with its Optuna trial numbers (the table lists them)."""
    from harness.reports.search import objective_column

    if len(summary.objectives) < 2:
        return None
    (x_metric, x_max), (y_metric, y_max) = summary.objectives[:2]
    history = summary.history
    x_column, y_column = objective_column(x_metric), objective_column(y_metric)
    complete = history[
        (history["state"] == "complete") & history[x_column].map(is_finite) & history[y_column].map(is_finite)
    ]
    if complete.empty:
        return None
    figure, axes = _new_figure(8.0, 4.6)
    ax = axes[0][0]
    if "param_method" in complete.columns:
        for method in sorted({str(m) for m in complete["param_method"].dropna()}, key=method_rank):
            part = complete[complete["param_method"] == method]
            ax.scatter(part[x_column], part[y_column], color=method_colour(method), s=36, label=method, zorder=2)
    else:
        ax.scatter(complete[x_column], complete[y_column], color="#1f77b4", s=36, label="complete trial", zorder=2)
    on_front = complete[complete["number"].isin(front)].sort_values(x_column, kind="stable")
    if len(on_front) > 1:
        ax.plot(
            on_front[x_column], on_front[y_column], color="#444444", linestyle="--", linewidth=1.0,
            label="Pareto front", zorder=1,
        )
    ax.scatter(
        on_front[x_column], on_front[y_column], s=150, facecolors="none", edgecolors="#222222",
        linewidths=1.3, zorder=3, label="on the front",
    )
    for _, row in on_front.iterrows():
        ax.annotate(
            str(int(row["number"])), (row[x_column], row[y_column]), textcoords="offset points",
            xytext=(7, 6), fontsize=8, fontweight="bold", color="#222222", annotation_clip=False,
        )
    ax.margins(x=0.08, y=0.12)
    direction = {True: "higher is better", False: "lower is better"}
    ax.set_xlabel(f"{axis_label(x_metric)}, {direction[x_max]}")
    ax.set_ylabel(f"{axis_label(y_metric)}, {direction[y_max]}")
    _legend_outside(ax)
    return figure


def importance_plot(summary: SearchSummary) -> Figure | None:
    if not summary.importances:
        return None
    names = list(summary.importances)
    values = [summary.importances[n] for n in names]
    figure, axes = _new_figure(6.5, 0.5 * len(names) + 1.4)
    ax = axes[0][0]
    ax.barh(names[::-1], values[::-1], color="#4c72b0")
    ax.set_xlabel("importance (fANOVA, fraction of variance)")
    ax.set_ylabel("searched knob")
    return figure


# ---------------------------------------------------------------------------------------------
# Kernel benchmarks


def _run_name(runs: list[str], position: float) -> str:
    index = math.floor(float(position) + 0.5)
    return runs[index] if 0 <= index < len(runs) else ""


def bench_trend_plot(trend: pd.DataFrame) -> Figure | None:
    import seaborn as sns

    if trend.empty or trend["order"].nunique() < 1:
        return None
    runs = [name for _, name in sorted({(o, r) for o, r in zip(trend["order"], trend["run"])})]
    kernels = sorted(trend["kernel"].unique())
    colours = sns.color_palette("colorblind", n_colors=max(len(kernels), 1))
    figure, axes = _new_figure(max(6.0, 1.1 * len(runs) + 4.0), 4.0)
    ax = axes[0][0]
    sns.lineplot(
        trend,
        x="order",
        y="ratio",
        hue="kernel",
        hue_order=kernels,
        palette=dict(zip(kernels, colours)),
        marker="o",
        ax=ax,
    )
    ax.axhline(1.0, color="#444444", linestyle="--", linewidth=1.0, label="reference")
    ax.xaxis.set_major_locator(FixedLocator(list(range(len(runs)))))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _run_name(runs, v)))
    ax.set_xlim(-0.3, len(runs) - 0.7)
    set_scale(ax, [*trend["ratio"], 1.0], "y")
    ax.set_xlabel("benchmark run (oldest first)")
    ax.set_ylabel("time ratio to reference (fast / reference)")
    _legend_outside(ax)
    return figure
