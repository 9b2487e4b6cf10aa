"""What every table and figure of a report shares: the metrics (labels, units, directions), the
method colours, number formatting and the deterministic figure style."""

from __future__ import annotations

import colorsys
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.metrics import EXTRA_METRICS as EXTRA_METRICS
from harness.metrics import METRICS as METRICS
from harness.metrics import TABLE_METRICS as TABLE_METRICS
from harness.metrics import Metric as Metric
from harness.spec import method_declarations

MIB = 2.0**20
# A table cell with no value: a metric the configuration does not produce (an untrained baseline
# has no training loss, throughput or memory) or that no seed recorded as a finite number.
MISSING = "—"


def method_colour(method: str) -> str:
    """The colour a method declares (its ``SPEC.colour``), so it keeps its colour in every figure of
    every report whatever else is compared; an unknown name (a method of a newer version in an old
    report) gets a hue derived from its characters (stable across runs, unlike ``hash``)."""
    declared = method_declarations().get(method)
    if declared is not None:
        return declared.colour
    hue = (sum(ord(c) * (i + 1) for i, c in enumerate(method)) % 360) / 360.0
    r, g, b = colorsys.hls_to_rgb(hue, 0.45, 0.6)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def method_rank(method: str) -> tuple[int, str]:
    """Sort key: the order of ``harness.methods.METHOD_FILES``, unknown methods after, by name."""
    names = tuple(method_declarations())
    return (names.index(method), "") if method in names else (len(names), str(method))


def palette(methods: list[str]) -> dict[str, str]:
    return {m: method_colour(m) for m in methods}


def is_finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def decimals_for(value: float, significant: int = 4) -> int:
    """Decimal places that show ``significant`` digits of ``value`` (at least 0, at most 6)."""
    if value == 0 or not math.isfinite(value):
        return 2
    magnitude = math.floor(math.log10(abs(value)))
    return max(0, min(6, significant - 1 - magnitude))


def format_number(value: Any, decimals: int | None = None) -> str:
    """A table number: 'nan' for missing and non-finite values (NaN is a result: a diverged trial),
    no scientific notation for usual magnitudes."""
    if value is None:
        return "nan"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "nan"
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    if decimals is None:
        decimals = decimals_for(number)
    if abs(number) >= 1e7 or (number != 0 and abs(number) < 1e-5):
        return f"{number:.3e}"
    text = f"{number:.{decimals}f}"
    return "0" + text[2:] if text.startswith("-0") and float(text) == 0 else text


def metric_decimals(metric: Metric, values: list[float]) -> int:
    """One number of decimals per column, so a column lines up: accuracies in % with 1 decimal,
    the others with 4 significant digits of the column's typical magnitude."""
    if metric.kind == "accuracy":
        return 1
    finite = [abs(v) for v in values if is_finite(v) and v != 0]
    if not finite:
        return 2
    finite.sort()
    return decimals_for(finite[len(finite) // 2])


def format_knob_value(value: Any) -> str:
    if value is None:
        return "full"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:g}"
    return str(value)


# Fixed rcParams on top of seaborn's theme: SVG ids hashed with a fixed salt and text kept as text,
# so the same database renders byte-identical files.
_FIXED_RC: dict[str, Any] = {
    "svg.hashsalt": "harness-report",
    "svg.fonttype": "none",
    "svg.image_inline": True,
    "path.simplify": True,
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "font.family": ["sans-serif"],
    "font.sans-serif": ["DejaVu Sans"],
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
}
SVG_METADATA: dict[str, Any] = {"Date": None, "Creator": None}


@contextmanager
def figure_style() -> Iterator[None]:
    """Seaborn's whitegrid theme and the fixed settings, for the duration of a build only (no
    global state changes: rc_context restores everything)."""
    import matplotlib as mpl
    import seaborn as sns

    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook"), **_FIXED_RC}
    with mpl.rc_context(rc=rc):
        yield


def save_svg(figure: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="svg", metadata=SVG_METADATA)
