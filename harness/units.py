"""How a person reads a metric: the one unit of each, shared by the command line and the reports.

The database, ``harness.results``' frames and Optuna's objective values keep accuracies as
fractions in [0, 1] (what the evaluation returns); everything printed for a person (``harness run``,
``harness status``, the reports) shows them in percent. Stdlib only.
"""

from __future__ import annotations

import math
from typing import Any

from harness.metrics import ACCURACY_METRICS

PERCENT_DECIMALS = 1


def is_accuracy(name: str) -> bool:
    return name in ACCURACY_METRICS


def metric_text(name: str, value: Any) -> str:
    """``value`` of metric ``name`` for the terminal: accuracies (stored as fractions) in percent
    with one decimal ("71.5%"), other metrics with four significant digits; "nan" for a non-finite
    value (a result: a diverged metric), "-" for none."""
    if value is None:
        return "-"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf")
    if is_accuracy(name):
        return f"{100.0 * number:.{PERCENT_DECIMALS}f}%"
    return f"{number:.4g}"
