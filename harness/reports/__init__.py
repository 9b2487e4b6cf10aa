"""Study reports from the database alone: comparison tables, ablation plots, curves, searches,
failures, provenance and kernel benchmarks, as Markdown and HTML (no torch import).

``build_report(db, "my-study")`` writes ``reports/my-study/{report.md,index.html,figures/}``;
``build_all(db)`` writes every study and ``reports/index.html``.
"""

from __future__ import annotations

from harness.reports.data import UnknownStudyError, study_names
from harness.reports.render import build_all, build_report

__all__ = ["UnknownStudyError", "build_all", "build_report", "study_names"]
