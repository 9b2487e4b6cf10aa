"""The summary metrics of a trial, declared once.

Each is a typed column of ``harness_trial`` (``harness.db.models``), may be a search objective
(``harness.spec``), and is a column of the reports' comparison table with its label, unit and
direction (``harness.reports.style``): all derived from :data:`SUMMARY`. Standard library only, so
the database layer, the study files and the reports can all read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One summary metric of a trial."""

    column: str
    label: str  # with the unit, as a table header and an axis label
    higher_is_better: bool
    kind: str = "plain"  # "accuracy" (a fraction, shown in %), "bytes" (shown in MiB) or "plain"
    objective: bool = True  # a search may optimize it
    in_table: bool = True  # a column of the reports' comparison table (else an extra)

    @property
    def short(self) -> str:
        """The label without its unit, for captions."""
        return self.label.split(" (")[0]


# In the order of the database columns. Directions are documented in docs/REPORTS.md.
SUMMARY: tuple[Metric, ...] = (
    Metric("final_loss", "final loss", False),
    Metric("knn_top1", "k-NN top-1 (%)", True, "accuracy"),
    Metric("linear_top1", "linear top-1 (%)", True, "accuracy"),
    Metric("linear_top5", "linear top-5 (%)", True, "accuracy"),
    Metric("alignment", "alignment", False),
    # Wang & Isola's uniformity is the log of a mean Gaussian potential: lower = more uniform.
    Metric("uniformity", "uniformity", False),
    Metric("effective_rank", "effective rank", True),
    Metric("feature_std", "feature std", True, in_table=False),
    Metric("train_img_per_s", "throughput (img/s)", True),
    Metric("peak_mem_bytes", "peak memory (MiB)", False, "bytes", objective=False),
    Metric("train_seconds", "training time (s)", False, objective=False),
    Metric("eval_seconds", "evaluation time (s)", False, objective=False, in_table=False),
)
METRICS: dict[str, Metric] = {metric.column: metric for metric in SUMMARY}
SUMMARY_METRICS: tuple[str, ...] = tuple(METRICS)
OBJECTIVE_METRICS: tuple[str, ...] = tuple(m.column for m in SUMMARY if m.objective)
ACCURACY_METRICS: tuple[str, ...] = tuple(m.column for m in SUMMARY if m.kind == "accuracy")
# The comparison table's columns, in order: accuracies first, then the rest.
TABLE_METRICS: tuple[Metric, ...] = tuple(
    sorted((m for m in SUMMARY if m.in_table), key=lambda m: (m.kind != "accuracy", SUMMARY.index(m)))
)
EXTRA_METRICS: tuple[Metric, ...] = tuple(m for m in SUMMARY if not m.in_table)
