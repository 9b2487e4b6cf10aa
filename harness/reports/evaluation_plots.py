"""Figures of the evaluations of saved encoders: accuracy against the label fraction (label
efficiency) and one 2-D embedding of the test features per method, coloured by class. Same
conventions as ``plots``: a ``Figure`` per function (no pyplot state), one colour per method, units
on the axes, None when there is nothing to draw."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from harness.reports.data import ReportData
from harness.reports.statistics import t_interval
from harness.reports.style import is_finite, method_colour, method_rank
from harness.reports.tables import PROTOCOL_LABELS, percent_text

# Line style per protocol in the label-efficiency figure: linear probe solid, fine-tuning dashed.
_PROTOCOL_STYLE: dict[str, tuple[str, str]] = {"linear": ("-", "o"), "finetune": ("--", "s")}
# tab10 for up to 10 classes, tab20 beyond (the embedding's class colours).
_MAX_TAB10 = 10


def _new_figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Figure, Any]:
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(nrows, ncols, squeeze=False)


def label_efficiency_plot(data: ReportData, groups: dict[str, str]) -> Figure | None:
    """Top-1 against the fraction of labels (log axis, %), one colour per method (its configuration
    in ``groups``: method -> group), linear probe solid and fine-tuning dashed; points are means
    over seeds with 95% t-interval error bars where a configuration has two seeds or more. The
    baselines are drawn too: random_init fine-tuned is training from scratch on those labels."""
    evaluations = data.evaluations
    if evaluations.empty:
        return None
    rows = evaluations[
        (evaluations["status"] == "complete")
        & ~evaluations["transfer"].astype(bool)
        & evaluations["protocol"].isin(list(_PROTOCOL_STYLE))
        & evaluations["group"].isin(list(groups.values()))
        & evaluations["fraction"].map(is_finite)
    ]
    if rows.empty or rows["fraction"].nunique() < 2:
        return None  # one fraction is a table, not a curve
    figure, axes = _new_figure(7.5, 4.2)
    ax = axes[0][0]
    fractions = sorted({float(f) for f in rows["fraction"]})
    for method in sorted(groups, key=method_rank):
        part = rows[rows["group"] == groups[method]]
        for protocol, (style, marker) in _PROTOCOL_STYLE.items():
            points = part[part["protocol"] == protocol]
            if points.empty:
                continue
            xs, ys, errors = [], [], []
            for fraction in fractions:
                values = points.loc[points["fraction"] == fraction, "top1"]
                interval = t_interval(float(v) for v in values)
                if not math.isfinite(interval.mean):
                    continue
                xs.append(100 * fraction)
                ys.append(interval.mean)
                errors.append(interval.half_width if interval.exists else 0.0)
            if not xs:
                continue
            label = f"{method} · {PROTOCOL_LABELS[protocol]}"
            if method == "random_init" and protocol == "finetune":
                label = "random_init · from scratch"
            ax.errorbar(
                xs, ys, yerr=errors, color=method_colour(method), linestyle=style, marker=marker,
                markersize=5, capsize=3, linewidth=1.5, label=label,
            )
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([100 * f for f in fractions]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: percent_text(v / 100)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("labeled training images (% of the training split, log scale)")
    ax.set_ylabel("top-1 (%)")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return figure


def embedding_groups(data: ReportData, groups: dict[str, str]) -> list[tuple[str, pd.Series]]:
    """Per method (in ``groups``), the stored embedding to draw: that configuration's lowest seed."""
    evaluations = data.evaluations
    if evaluations.empty:
        return []
    rows = evaluations[(evaluations["status"] == "complete") & (evaluations["protocol"] == "embedding")]
    chosen = []
    for method in sorted(groups, key=method_rank):
        part = rows[rows["group"] == groups[method]].sort_values(["seed", "evaluation_id"])
        part = part[part["details"].map(lambda d: isinstance(d, dict) and bool(d.get("x")))]
        if not part.empty:
            chosen.append((method, part.iloc[0]))
    return chosen


def embedding_plot(data: ReportData, groups: dict[str, str]) -> Figure | None:
    """One panel per method: the stored 2-D t-SNE map of its test features, each point coloured by
    its class (one legend of class names for all panels)."""
    import matplotlib as mpl

    chosen = embedding_groups(data, groups)
    if not chosen:
        return None
    ncols = min(4, len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    figure, axes = _new_figure(3.2 * ncols + 1.6, 3.2 * nrows, ncols=ncols, nrows=nrows)
    classes = sorted({int(c) for _, row in chosen for c in row["details"]["label"]})
    cmap = mpl.colormaps["tab10" if len(classes) <= _MAX_TAB10 else "tab20"]
    colours = {c: cmap(i % cmap.N) for i, c in enumerate(classes)}
    names: list[str] = []
    for _, row in chosen:
        names = list(row["details"].get("class_names") or [])
        if names:
            break
    for index, (method, row) in enumerate(chosen):
        ax = axes[index // ncols][index % ncols]
        details = row["details"]
        x, y = np.asarray(details["x"], dtype=float), np.asarray(details["y"], dtype=float)
        labels = np.asarray(details["label"], dtype=int)
        for c in classes:
            mask = labels == c
            if mask.any():
                name = names[c] if c < len(names) else str(c)
                ax.scatter(x[mask], y[mask], s=6, color=colours[c], label=name, linewidths=0, rasterized=False)
        ax.set_title(f"{method} (seed {int(row['seed'])})", color=method_colour(method))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("t-SNE 1 (no unit)")
        ax.set_ylabel("t-SNE 2 (no unit)")
    for index in range(len(chosen), nrows * ncols):
        axes[index // ncols][index % ncols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside right upper", frameon=False, title="class", markerscale=2.5)
    return figure
