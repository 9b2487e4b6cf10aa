"""Everything a report reads, loaded once from the database: the study row and its parsed file,
the trials (with a configuration label each), the curves and the kernel benchmarks."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import select

from harness.db import Database, StudyRow
from harness.metrics import ACCURACY_METRICS
from harness.reports.style import format_knob_value, is_finite, method_rank
from harness.results import bench_frame, evaluations_frame, metrics_frame, trials_frame
from harness.spec import (
    KNOB_NAMES,
    TRAINING_KNOBS,
    SpecError,
    Study,
    method_declarations,
    parse_study,
    readers_of,
    resolve,
)

ACCURACY_COLUMNS: tuple[str, ...] = ACCURACY_METRICS  # shown in %, stored as fractions
# Knobs that never make two trials different configurations.
_NOT_CONFIGURATION: frozenset[str] = frozenset({"seed", "device", "data_root"})


class UnknownStudyError(LookupError):
    """A study name the database does not hold; ``known`` lists the names it does."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        listing = ", ".join(known) if known else "none: the database holds no study yet"
        super().__init__(f"no study named {name!r} in the database; known studies: {listing}")


@dataclass(frozen=True)
class StudyInfo:
    name: str
    kind: str
    description: str
    file_text: str
    file_hash: str
    created_at: datetime | None


@dataclass
class ReportData:
    """One study's rows, ready for tables and figures.

    ``trials`` has one row per trial with, besides the columns of ``results.trials_frame``,
    ``label`` (method plus the knobs the study varies), ``group`` (the configuration's identity),
    ``is_reference`` (a baseline method) and the accuracies in percent.
    """

    info: StudyInfo
    spec: Study | None
    spec_error: str | None
    swept: tuple[str, ...]  # knobs the study varies, method included when it varies
    trials: pd.DataFrame
    metrics: pd.DataFrame
    bench: pd.DataFrame
    accuracy_factor: float  # 100 when the database stores accuracies as fractions, else 1
    # ``results.evaluations_frame`` of the study's complete trials, with the trial's ``group``,
    # ``label``, ``method``, ``seed`` and ``is_reference``; accuracies (top1, top5, spread) in %.
    evaluations: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def complete(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] == "complete"]

    @property
    def label_knobs(self) -> tuple[str, ...]:
        return tuple(k for k in self.swept if k != "method")

    @property
    def methods(self) -> list[str]:
        return sorted({str(m) for m in self.trials["method"].dropna()}, key=method_rank)

    @property
    def last_end(self) -> datetime | None:
        ended = [t for t in self.trials.get("ended_at", pd.Series(dtype=object)) if isinstance(t, datetime)]
        return max(ended) if ended else None

    @property
    def as_of(self) -> datetime | None:
        """The report's date: the database's latest trial end (never the build's time), else the
        study's creation."""
        return self.last_end or self.info.created_at


def study_names(db: Database) -> list[str]:
    return sorted(db.run(lambda session: list(session.scalars(select(StudyRow.name)))))


def load_study_info(db: Database, name: str) -> StudyInfo:
    def query(session: Any) -> StudyInfo | None:
        row = session.scalars(select(StudyRow).where(StudyRow.name == name)).first()
        if row is None:
            return None
        return StudyInfo(
            name=row.name,
            kind=row.kind,
            description=row.description or "",
            file_text=row.file_text or "",
            file_hash=row.file_hash or "",
            created_at=row.created_at,
        )

    info = db.run(query)
    if info is None:
        raise UnknownStudyError(name, study_names(db))
    return info


def load(db: Database, name: str, bench: pd.DataFrame | None = None) -> ReportData:
    """Read one study; ``bench`` lets ``build_all`` read the benchmark table once for every study."""
    info = load_study_info(db, name)
    spec: Study | None = None
    spec_error: str | None = None
    try:
        spec = parse_study(info.file_text, source=f"study {name}")
    except SpecError as error:
        spec_error = str(error)
    trials = trials_frame(db, name)
    metrics = metrics_frame(db, name)
    if bench is None:
        bench = bench_frame(db)
    swept = _swept_knobs(spec, trials)
    factor = accuracy_factor(trials, metrics)
    trials = _annotate(trials, swept, factor, spec, info.kind)
    if not metrics.empty:
        metrics = metrics.copy()
        accuracy_rows = metrics["name"].isin(ACCURACY_COLUMNS)
        metrics.loc[accuracy_rows, "value"] = metrics.loc[accuracy_rows, "value"] * factor
    return ReportData(
        info=info,
        spec=spec,
        spec_error=spec_error,
        swept=swept,
        trials=trials,
        metrics=metrics,
        bench=bench,
        accuracy_factor=factor,
        evaluations=annotate_evaluations(evaluations_frame(db, name), trials),
    )


EVALUATION_ACCURACIES: tuple[str, ...] = ("top1", "top5", "spread")


def annotate_evaluations(evaluations: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """The evaluations of complete trials, with each trial's configuration identity and label.
    Evaluations are always written as fractions (this harness's evaluate step), so they are shown
    times 100 whatever the trials' unit."""
    columns = ["group", "label", "method", "seed", "is_reference", "order"]
    if evaluations.empty or trials.empty:
        return pd.DataFrame(columns=[*evaluations.columns, *columns])
    complete = trials[trials["status"] == "complete"][["trial_id", *columns]]
    merged = evaluations.merge(complete, on="trial_id", how="inner")
    for column in EVALUATION_ACCURACIES:
        merged[column] = pd.to_numeric(merged[column], errors="coerce") * 100.0
    return merged.reset_index(drop=True)


def accuracy_factor(trials: pd.DataFrame, metrics: pd.DataFrame) -> float:
    """Reports show accuracies in %. The database stores fractions in [0, 1] (what the evaluation
    returns); a database whose accuracies exceed 1 already holds percentages and is shown as is."""
    values: list[float] = []
    for column in ACCURACY_COLUMNS:
        if column in trials.columns:
            values.extend(float(v) for v in trials[column] if is_finite(v))
    if not metrics.empty:
        values.extend(
            float(v) for v in metrics.loc[metrics["name"].isin(ACCURACY_COLUMNS), "value"] if is_finite(v)
        )
    return 1.0 if values and max(values) > 1.0 + 1e-9 else 100.0


def _swept_knobs(spec: Study | None, trials: pd.DataFrame) -> tuple[str, ...]:
    """The study's varied knobs, in file order: the keys of its grid/ablation points (a knob set
    in ``fixed`` and ablated around it included) or its search space; without a parseable file,
    the configuration columns that take more than one value."""
    if spec is not None:
        swept: list[str] = []
        if spec.search is not None:
            swept = [p.name for p in spec.search.space]
        else:
            for point in spec.points:
                swept.extend(k for k in point if k not in swept)
        if "method" not in swept and "method" in trials.columns and trials["method"].nunique() > 1:
            swept.insert(0, "method")
        return tuple(swept)
    varying: list[str] = []
    for knob in KNOB_NAMES:
        if knob in _NOT_CONFIGURATION or knob not in trials.columns:
            continue
        if trials[knob].map(format_knob_value).nunique() > 1:
            varying.append(knob)
    return tuple(varying)


def reads_knob(method: str, knob: str) -> bool:
    """Whether ``method`` uses ``knob``: spec resets the method-specific knobs a method does not
    read to their defaults, and an untrained method (random_init) its training knobs, so a label
    leaves them out and an ablation plot draws them flat."""
    declared = method_declarations().get(method)
    if declared is None:  # a method of a newer version: assume it reads everything
        return True
    if method not in readers_of(knob):
        return False
    if not declared.trains:
        return knob not in TRAINING_KNOBS
    return True


def configuration_label(row: pd.Series | dict[str, Any], knobs: tuple[str, ...]) -> str:
    method = str(row.get("method", "?"))
    parts = [
        f"{k}={format_knob_value(plain_value(row.get(k)))}"
        for k in knobs
        if k in row and reads_knob(method, k)
    ]
    return f"{method} · {', '.join(parts)}" if parts else method


def ablation_base(
    spec: Study | None, method: str, knobs: tuple[str, ...], trials: pd.DataFrame
) -> dict[str, str]:
    """The base value of each ablated knob for ``method`` (formatted): the study's fixed part
    resolved for that method (so a method's own defaults count as its base), else the value most
    of the method's trials share."""
    config = None
    if spec is not None:
        for overrides in ({**spec.fixed, "method": method}, dict(spec.fixed)):
            try:
                config = resolve(overrides)
                break
            except SpecError:
                continue
    own = trials[trials["method"] == method] if "method" in trials.columns else trials
    base: dict[str, str] = {}
    for knob in knobs:
        if config is not None and hasattr(config, knob):
            base[knob] = format_knob_value(getattr(config, knob))
        elif knob in own.columns and not own.empty:
            base[knob] = str(most_common(list(own[knob])))
    return base


def plain_value(value: Any) -> Any:
    """pandas turns None into NaN in numeric columns; a knob's None (the whole split) comes back."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def knob_sort_key(value: Any) -> tuple[int, float, str]:
    value = plain_value(value)
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def _annotate(
    trials: pd.DataFrame, swept: tuple[str, ...], factor: float, spec: Study | None, kind: str
) -> pd.DataFrame:
    trials = trials.copy()
    if trials.empty:
        for column in ("label", "group", "is_reference", "method", "order"):
            trials[column] = pd.Series(dtype=object)
        return trials
    if "method" not in trials.columns:
        trials["method"] = "?"
    knobs = tuple(k for k in swept if k != "method")
    labels: list[str] = []
    orders: list[tuple[Any, ...]] = []
    bases = (
        {m: ablation_base(spec, str(m), knobs, trials) for m in trials["method"].unique()}
        if kind == "ablate"
        else {}
    )
    for _, row in trials.iterrows():
        method = str(row["method"])
        if kind == "ablate":
            # One factor at a time: a row is named by what it changes from the base point.
            changed = [
                k
                for k in knobs
                if k in row
                and reads_knob(method, k)
                and format_knob_value(plain_value(row[k])) != bases[method].get(k)
            ]
            parts = [f"{k}={format_knob_value(plain_value(row[k]))}" for k in changed]
            labels.append(f"{method} · {', '.join(parts)}" if parts else f"{method} · base")
            first = min((knobs.index(k) for k in changed), default=-1)
            orders.append((method_rank(method), first, *(knob_sort_key(row.get(k)) for k in knobs)))
        else:
            labels.append(configuration_label(row, knobs))
            orders.append((method_rank(method), 0, *(knob_sort_key(row.get(k)) for k in knobs)))
    trials["label"] = labels
    trials["order"] = orders
    # The configuration hash is the identity; a label shared by two hashes (the study's fixed part
    # changed between runs) gets the hash's start so the rows stay apart.
    hashes_per_label: dict[str, set[str]] = {}
    for label, digest in zip(trials["label"], trials["config_hash"]):
        hashes_per_label.setdefault(label, set()).add(str(digest))
    trials["label"] = [
        f"{label} [{str(digest)[:7]}]" if len(hashes_per_label[label]) > 1 else label
        for label, digest in zip(trials["label"], trials["config_hash"])
    ]
    trials["group"] = trials["config_hash"].astype(str)
    trials["is_reference"] = trials["method"].isin([n for n, m in method_declarations().items() if m.baseline])
    for column in ACCURACY_COLUMNS:
        if column in trials.columns:
            trials[column] = pd.to_numeric(trials[column], errors="coerce") * factor
    for column in (
        "final_loss",
        "alignment",
        "uniformity",
        "effective_rank",
        "feature_std",
        "train_img_per_s",
        "peak_mem_bytes",
        "train_seconds",
        "eval_seconds",
    ):
        if column in trials.columns:
            trials[column] = pd.to_numeric(trials[column], errors="coerce")
    return trials


def group_order(trials: pd.DataFrame) -> list[str]:
    """Configuration groups in report order: method (spec order), then the varied knobs' values
    (an ablation: the base point first, then each knob's values in file order)."""
    firsts = trials.drop_duplicates("group")
    ordered = sorted((row["order"], str(row["label"]), str(row["group"])) for _, row in firsts.iterrows())
    return [group for _, _, group in ordered]


def most_common(values: list[Any]) -> Any:
    counts = Counter(format_knob_value(plain_value(v)) for v in values)
    best = max(counts.values())
    return sorted(k for k, c in counts.items() if c == best)[0]
