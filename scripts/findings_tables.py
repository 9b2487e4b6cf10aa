"""Regenerate the tables of docs/FINDINGS.md from the study databases in results/baselines/.

A table is a block of FINDINGS.md between

    <!-- findings-table study=cpu-temperature by=method,temperature -->
    <!-- end findings-table -->

(``study``: the study, read from ``results/baselines/<study>.db``; ``by``: the knobs that make a row).
Everything between the two markers is rewritten: the study's status and one row per configuration
with n, mean ± sd and the 95% t-interval over seeds (harness.reports.statistics, the reports' own
arithmetic), k-NN against the study's random-init baseline where it has one, and the seeds the
reports flag as collapsed (harness.reports.collapse).

A cost table (``<!-- findings-table study=cpu-cost by=method,supervised_views kind=cost -->``) has
training throughput and peak memory instead, each also as a multiple of standard supervised
training (the supervised row with one view, else the supervised row): time per image
(reference throughput / throughput) and memory (memory / reference memory).

    python scripts/findings_tables.py            # rewrite docs/FINDINGS.md
    python scripts/findings_tables.py --check    # exit 1 when a table differs from its database
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from harness.reports.collapse import collapse_reasons
from harness.reports.statistics import t_interval
from harness.results import trials_frame
from harness.spec import KNOBS, METHOD_KNOBS, METHOD_SPECIFIC_KNOBS

REPO = Path(__file__).resolve().parent.parent
FINDINGS = REPO / "docs" / "FINDINGS.md"
BASELINES = REPO / "results" / "baselines"
BLOCK = re.compile(
    r"(?P<open><!-- findings-table study=(?P<study>[\w.-]+) by=(?P<by>[\w,]+)(?: kind=(?P<kind>cost))? -->\n)"
    r"(?P<body>.*?)(?P<close><!-- end findings-table -->)",
    re.S,
)
# (column heading, frame column, scale, decimals)
COLUMNS: tuple[tuple[str, str, float, int], ...] = (
    ("k-NN top-1 (%)", "knn_top1", 100.0, 1),
    ("linear top-1 (%)", "linear_top1", 100.0, 1),
    ("final loss", "final_loss", 1.0, 3),
    ("uniformity", "uniformity", 1.0, 2),
    ("effective rank", "effective_rank", 1.0, 1),
)


def cell(values: Iterable[float], scale: float, decimals: int) -> str:
    """'mean ± sd [low, high]' (95% t-interval of the mean); the mean alone for one seed."""
    # A metric the configuration does not have (random init's loss) is None, or NaN in a column
    # that other configurations fill.
    values = list(values)
    present = [float(v) * scale for v in values if v is not None and not math.isnan(float(v))]
    if not present:
        return "–"
    interval = t_interval(present)
    # A seed without the value (diverged: NaN) is named, not silently left out of the mean.
    missing = f" ({len(values) - len(present)} of {len(values)} missing)" if len(present) < len(values) else ""
    text = f"{interval.mean:.{decimals}f}"
    if interval.exists:
        text += f" ± {interval.std:.{decimals}f} [{interval.low:.{decimals}f}, {interval.high:.{decimals}f}]"
    return text + missing


def status_line(frame: pd.DataFrame) -> str:
    counts = frame["status"].value_counts()
    total, complete = int(counts.sum()), int(counts.get("complete", 0))
    others = ", ".join(f"{int(n)} {status}" for status, n in counts.items() if status != "complete")
    return f"Study status: {complete} of {total} trials complete" + (f" ({others})." if others else ".")


def _frame(study: str, by: list[str]) -> pd.DataFrame:
    database = BASELINES / f"{study}.db"
    if not database.exists():
        raise SystemExit(f"{FINDINGS}: findings-table study={study}: no database {database}")
    frame = trials_frame(database, study)
    if frame.empty:
        raise SystemExit(f"{FINDINGS}: findings-table study={study}: {database} holds no trials of that study")
    unknown = [key for key in by if key not in frame.columns]
    if unknown:
        raise SystemExit(f"{FINDINGS}: findings-table study={study}: by={','.join(unknown)} is not a knob of its trials")
    # A trial stored before a knob existed has no value for it: it ran with the knob's legacy value
    # if its method reads the knob (and stays without one if it does not).
    for key in by:
        if key in KNOBS and key in METHOD_SPECIFIC_KNOBS and frame[key].isna().any():
            reads = frame["method"].map(lambda method, key=key: key in METHOD_KNOBS.get(method, ()))
            frame.loc[frame[key].isna() & reads, key] = KNOBS[key].legacy
    return frame


def table(study: str, by: list[str]) -> str:
    frame = _frame(study, by)
    complete = frame[frame["status"] == "complete"]
    baseline = complete[complete["method"] == "random_init"]["knn_top1"]
    floor = float(baseline.mean()) if len(baseline) else None
    lines = [
        status_line(frame),
        "",
        "| " + " | ".join([*by, "n", COLUMNS[0][0], "vs random init", *(c[0] for c in COLUMNS[1:]), "collapsed seeds"]) + " |",
        "|" + " --- |" * (len(by) + len(COLUMNS) + 3),
    ]
    for key, group in complete.groupby(by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        cells = [_key_text(knob, k) for knob, k in zip(by, key)] + [str(len(group))]
        for index, (_, column, scale, decimals) in enumerate(COLUMNS):
            cells.append(cell(group[column], scale, decimals))
            if index == 0:
                untrained = floor is None or group["method"].iloc[0] == "random_init"
                cells.append("–" if untrained else f"{100 * (group['knn_top1'].mean() - floor):+.1f}")
        collapsed = [str(int(row["seed"])) for _, row in group.iterrows() if collapse_reasons(row)]
        cells.append(", ".join(collapsed) or "none")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cost_table(study: str, by: list[str]) -> str:
    frame = _frame(study, by)
    complete = frame[frame["status"] == "complete"]
    supervised = complete[complete["method"] == "supervised"]
    if "supervised_views" in supervised.columns and (supervised["supervised_views"] == 1).any():
        supervised = supervised[supervised["supervised_views"] == 1]
    if supervised.empty:
        raise SystemExit(f"{FINDINGS}: findings-table study={study} kind=cost: no complete supervised trial to compare with")
    reference_rate = float(supervised["train_img_per_s"].mean())
    reference_memory = float(supervised["peak_mem_bytes"].mean())
    mib = 1.0 / 2**20
    lines = [
        status_line(frame),
        "",
        "| " + " | ".join([*by, "n", "throughput (img/s)", "time per image (x supervised)", "peak memory (MiB)",
                          "memory (x supervised)"]) + " |",
        "|" + " --- |" * (len(by) + 5),
    ]
    for key, group in complete.groupby(by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        rate, memory = float(group["train_img_per_s"].mean()), float(group["peak_mem_bytes"].mean())
        cells = [_key_text(knob, k) for knob, k in zip(by, key)] + [str(len(group))]
        cells += [
            cell(group["train_img_per_s"], 1.0, 0),
            f"{reference_rate / rate:.2f}" if rate > 0 else "–",
            cell(group["peak_mem_bytes"], mib, 1),
            f"{memory / reference_memory:.2f}" if math.isfinite(memory) and reference_memory > 0 else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _key_text(knob: str, value: object) -> str:
    """A knob's value in a row key, as its type writes it (an integer knob read back as a float from
    a column with gaps is still an integer); a knob a method does not read is stored as nothing: '–'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    integer = knob in KNOBS and KNOBS[knob].base_type is int
    return str(int(value)) if integer and isinstance(value, float) and value.is_integer() else str(value)


def regenerate(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        by = match["by"].split(",")
        body = cost_table(match["study"], by) if match["kind"] == "cost" else table(match["study"], by)
        return match["open"] + body + match["close"]

    return BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a table differs from its database")
    args = parser.parse_args(argv)
    text = FINDINGS.read_text()
    new = regenerate(text)
    if args.check:
        if new != text:
            print(f"{FINDINGS}: tables differ from results/baselines/; run python scripts/findings_tables.py")
            return 1
        return 0
    FINDINGS.write_text(new)
    print(f"{FINDINGS}: {len(BLOCK.findall(new))} tables regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
