"""The regression gate: compare this run's fast/reference ratios with a baseline's.

Only ratios are compared, never absolute times: a ratio measured in one run on one machine cancels
the machine's speed, so a baseline saved on one computer gates a run on another of the same kind.
For every non-reference row (kernel, implementation, case, direction, device, dtype) present in
both, ``change = ratio_now / ratio_baseline - 1``; the gate fails when a change exceeds the
threshold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

KEY_FIELDS: tuple[str, ...] = ("kernel", "impl", "case", "direction", "device", "dtype")


def parse_threshold(text: str | float) -> float:
    """``"10%"`` or ``"0.1"`` -> 0.1. A bare number must be a fraction below 1 (write 150% for 1.5),
    so that ``10`` is not silently read as a 1000% allowance."""
    if isinstance(text, (int, float)):
        value = float(text)
        percent = False
    else:
        stripped = text.strip()
        percent = stripped.endswith("%")
        try:
            value = float(stripped.removesuffix("%").strip())
        except ValueError:
            raise ValueError(f"max slowdown must look like 10% or 0.1, got {text!r}") from None
        if percent:
            value /= 100.0
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"max slowdown must be a non-negative number, got {text!r}")
    if not percent and value >= 1:
        raise ValueError(
            f"max slowdown {text!r} is ambiguous: write a fraction (0.1) or a percentage ({value:g}%)"
        )
    return value


@dataclass(frozen=True)
class Change:
    key: tuple[str, ...]
    baseline_ratio: float | None
    current_ratio: float | None
    change: float | None
    verdict: str  # "ok", "faster", "SLOWER", "new" (not in the baseline)

    @property
    def failed(self) -> bool:
        return self.verdict == "SLOWER"


@dataclass(frozen=True)
class Comparison:
    changes: list[Change]
    max_slowdown: float
    notes: tuple[str, ...] = ()

    @property
    def compared(self) -> list[Change]:
        return [c for c in self.changes if c.change is not None]

    @property
    def failures(self) -> list[Change]:
        return [c for c in self.changes if c.failed]

    @property
    def passed(self) -> bool:
        return bool(self.compared) and not self.failures


def _key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(row[field]) for field in KEY_FIELDS)


def compare(
    current: Iterable[dict[str, Any]], baseline: Iterable[dict[str, Any]], max_slowdown: float
) -> Comparison:
    base = {_key(row): row for row in baseline if row["impl"] != "reference"}
    changes: list[Change] = []
    threads: set[str] = set()
    for row in current:
        if row["impl"] == "reference":
            continue
        key = _key(row)
        now = row["ratio_to_reference"]
        old_row = base.get(key, {})
        old = old_row.get("ratio_to_reference")
        old_threads = (old_row.get("params") or {}).get("threads")
        new_threads = (row.get("params") or {}).get("threads")
        if old is not None and old_threads != new_threads:
            threads.add(f"{key[0]}: {old_threads} -> {new_threads}")
        if old is None or now is None or not old > 0:
            changes.append(Change(key, old, now, None, "new"))
            continue
        change = now / old - 1.0
        # Symmetric band: an equally large improvement is reported (a baseline worth refreshing).
        verdict = "SLOWER" if change > max_slowdown else "faster" if change < -max_slowdown else "ok"
        changes.append(Change(key, old, now, change, verdict))
    # Failures first (worst first), then the rest by how far they moved, new cases last.
    changes.sort(key=lambda c: (not c.failed, c.change is None, -abs(c.change or 0.0)))
    notes: tuple[str, ...] = ()
    if threads:
        notes = (
            f"CPU thread counts differ from the baseline ({'; '.join(sorted(threads))}): ratios may move",
        )
    return Comparison(changes, max_slowdown, notes)


def format_table(comparison: Comparison) -> str:
    """A plain-text table: kernel, impl, case, direction, baseline ratio, current ratio, change, verdict."""
    header = ("kernel", "impl", "case", "direction", "device", "baseline", "current", "change", "verdict")
    lines: list[tuple[str, ...]] = [header]
    for c in comparison.changes:
        kernel, impl, case, direction, device, _dtype = c.key
        lines.append(
            (
                kernel,
                impl,
                case,
                direction,
                device,
                "-" if c.baseline_ratio is None else f"{c.baseline_ratio:.3f}",
                "-" if c.current_ratio is None else f"{c.current_ratio:.3f}",
                "-" if c.change is None else f"{c.change * 100:+.1f}%",
                c.verdict,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    summary = (
        f"{len(comparison.compared)} compared, {len(comparison.failures)} slower than the baseline by more than "
        f"{comparison.max_slowdown * 100:g}%: {'PASS' if comparison.passed else 'FAIL'}"
    )
    return "\n".join([*text, "", *comparison.notes, summary])
