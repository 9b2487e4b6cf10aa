"""What a search study's report shows from its Optuna study (same database, same name): the
optimization history, the parameter importances and the best trials. Optuna is imported here
only, when a search is reported (it is slow to import and the other reports do not need it)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from harness.db import Database
from harness.reports.data import ACCURACY_COLUMNS, ReportData, plain_value
from harness.reports.document import Cell, Table
from harness.reports.statistics import RELIABLE_IMPORTANCE_TRIALS
from harness.reports.style import (
    METRICS,
    MISSING,
    format_knob_value,
    format_number,
    is_finite,
    metric_decimals,
)
from harness.reports.tables import metric_label

BEST_TRIALS = 10
# User attributes harness.study.search sets on Optuna trials.
SUPERSEDED = "harness_superseded"
HARNESS_TRIAL = "harness_trial_id"
# Optuna's trial states in the harness's words.
_STATES: dict[str, str] = {
    "COMPLETE": "complete",
    "PRUNED": "pruned",
    "FAIL": "failed",
    "RUNNING": "running",
    "WAITING": "pending",
}
MIN_IMPORTANCE_TRIALS = 3
IMPORTANCE_SEED = 0  # fANOVA fits a random forest: a fixed seed keeps the report deterministic


@dataclass
class SearchSummary:
    metric: str
    maximize: bool
    source: str  # "optuna" or "harness" (the Optuna study was not found)
    # number, state, value (the first objective, report units), best (best so far), method, and
    # for a multi-objective search value_<metric> per objective
    history: pd.DataFrame
    params: list[str]
    importances: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # (metric, maximize) of every objective; one entry for a single-objective search
    objectives: list[tuple[str, bool]] = field(default_factory=list)

    @property
    def axis_label(self) -> str:
        return metric_label(self.metric)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


def objective_column(metric: str) -> str:
    return f"value_{metric}"


def summarize(db: Database, data: ReportData) -> SearchSummary | None:
    spec = data.spec
    if spec is None or spec.search is None:
        return None
    metric = spec.search.metric
    maximize = spec.search.direction == "maximize"
    objectives = [(m, d == "maximize") for m, d in spec.search.all_objectives]
    factors = [data.accuracy_factor if m in ACCURACY_COLUMNS else 1.0 for m, _ in objectives]
    params = [p.name for p in spec.search.space]
    try:
        summary = _from_optuna(db, data.info.name, objectives, factors, params)
    except Exception as error:  # any storage problem falls back to the harness rows
        summary = _from_trials(data, objectives, params)
        summary.notes.append(
            f"The Optuna study {data.info.name!r} could not be read from the database "
            f"({type(error).__name__}: {error}); the history below comes from the harness's trials."
        )
    assert (summary.metric, summary.maximize) == (metric, maximize)
    return summary


def _from_optuna(
    db: Database, name: str, objectives: list[tuple[str, bool]], factors: list[float], params: list[str]
) -> SearchSummary:
    metric, maximize = objectives[0]
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = optuna.storages.RDBStorage(db.url, skip_compatibility_check=True, skip_table_creation=True)
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            # A trial the harness handed back or took over is failed and marked superseded: a new
            # Optuna trial replaced it, so it is not part of the search's history.
            trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SUPERSEDED)]
            records = []
            for trial in sorted(trials, key=lambda t: t.number):
                # trial.value raises for a multi-objective study; values holds every objective.
                values = list(trial.values) if trial.state == TrialState.COMPLETE and trial.values else []
                value = values[0] if values else None
                if value is None and trial.intermediate_values:
                    value = trial.intermediate_values[max(trial.intermediate_values)]
                record: dict[str, Any] = {
                    "number": trial.number,
                    "state": _STATES.get(trial.state.name, trial.state.name.lower()),
                    "value": float(value) * factors[0] if is_finite(value) else math.nan,
                    "harness_trial": trial.user_attrs.get(HARNESS_TRIAL),
                }
                if len(objectives) > 1:
                    for index, (name_, _) in enumerate(objectives):
                        number = values[index] if index < len(values) else None
                        record[objective_column(name_)] = (
                            float(number) * factors[index] if is_finite(number) else math.nan
                        )
                for param in sorted(trial.params):
                    record[f"param_{param}"] = trial.params[param]
                records.append(record)
            summary = SearchSummary(
                metric,
                maximize,
                "optuna",
                _with_best(pd.DataFrame.from_records(records), maximize),
                params,
                objectives=list(objectives),
            )
            complete = [t for t in trials if t.state == TrialState.COMPLETE]
            summary.importances, note = _importances(study, complete)
            if note:
                summary.notes.append(note)
        finally:
            storage.remove_session()
            storage.engine.dispose()
    return summary


def _importances(study: Any, complete: list[Any]) -> tuple[dict[str, float], str | None]:
    """fANOVA importances, or a note saying why there are none. Below a few complete trials with
    different values Optuna either raises or returns equal shares, which would read as a result."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    distinct = {float(t.values[0]) for t in complete if t.values and is_finite(t.values[0])}
    if len(complete) < MIN_IMPORTANCE_TRIALS or len(distinct) < 2:
        return {}, (
            f"Parameter importances could not be computed from {len(complete)} complete trial(s): they need at "
            f"least {MIN_IMPORTANCE_TRIALS} complete trials whose objective values differ."
        )
    try:
        importances = optuna.importance.get_param_importances(
            study,
            evaluator=FanovaImportanceEvaluator(seed=IMPORTANCE_SEED),
            # Of the first objective: a multi-objective study needs a target to rank by.
            target=(lambda t: t.values[0]) if len(study.directions) > 1 else None,
        )
    except Exception as error:  # fANOVA refuses degenerate searches in several ways
        return {}, (
            f"Parameter importances could not be computed from {len(complete)} complete trial(s) "
            f"({type(error).__name__}: {error})."
        )
    if not importances:
        return {}, "Parameter importances: no parameter varied among the complete trials."
    ordered = dict(sorted(importances.items(), key=lambda kv: (-kv[1], kv[0])))
    if len(complete) < RELIABLE_IMPORTANCE_TRIALS:
        return ordered, (
            f"Caveat: these importances come from {len(complete)} complete trials, fewer than "
            f"{RELIABLE_IMPORTANCE_TRIALS}; a random forest fitted to so few points can rank the parameters by "
            "noise. Read them as a hint, not a finding."
        )
    return ordered, None


def _from_trials(data: ReportData, objectives: list[tuple[str, bool]], params: list[str]) -> SearchSummary:
    metric, maximize = objectives[0]
    trials = data.trials
    records = []
    if not trials.empty and metric in trials.columns:
        ordered = trials.sort_values(["optuna_number", "trial_id"], na_position="last", kind="stable")
        for index, (_, row) in enumerate(ordered.iterrows()):
            if row["status"] not in ("complete", "pruned", "failed"):
                continue
            number = row["optuna_number"]
            record: dict[str, Any] = {
                "number": int(number) if is_finite(number) else index,
                "state": str(row["status"]),
                "value": float(row[metric])
                if row["status"] == "complete" and is_finite(row[metric])
                else math.nan,
                "harness_trial": int(row["trial_id"]),
            }
            if len(objectives) > 1:
                for name, _ in objectives:
                    cell = row.get(name)
                    record[objective_column(name)] = (
                        float(cell) if row["status"] == "complete" and is_finite(cell) else math.nan
                    )
            for param in params:
                record[f"param_{param}"] = plain_value(row.get(param))
            records.append(record)
    summary = SearchSummary(
        metric,
        maximize,
        "harness",
        _with_best(pd.DataFrame.from_records(records), maximize),
        params,
        objectives=list(objectives),
    )
    summary.notes.append("Parameter importances need the Optuna study; none are shown.")
    return summary


def _with_best(history: pd.DataFrame, maximize: bool) -> pd.DataFrame:
    if history.empty:
        return pd.DataFrame(columns=["number", "state", "value", "best", "harness_trial"])
    best: list[float] = []
    current = math.nan
    for state, value in zip(history["state"], history["value"]):
        if (
            state == "complete"
            and math.isfinite(value)
            and (math.isnan(current) or (value > current if maximize else value < current))
        ):
            current = value
        best.append(current)
    history = history.copy()
    history["best"] = best
    return history


def best_trials_table(summary: SearchSummary, data: ReportData) -> Table | None:
    history = summary.history
    if history.empty:
        return None
    complete = history[(history["state"] == "complete") & history["value"].map(math.isfinite)]
    if complete.empty:
        return None
    ranked = complete.sort_values(
        ["value", "number"], ascending=[not summary.maximize, True], kind="stable"
    ).head(BEST_TRIALS)
    params = [p for p in summary.params if f"param_{p}" in history.columns]
    by_number = {}
    if "optuna_number" in data.trials.columns:
        for _, row in data.trials.iterrows():
            if is_finite(row["optuna_number"]):
                by_number.setdefault(int(row["optuna_number"]), []).append(int(row["trial_id"]))
    # The comparison table's decimals, so both tables show the same numbers.
    metric = METRICS.get(summary.metric)
    decimals = metric_decimals(metric, list(complete["value"])) if metric is not None else None
    rows = []
    for rank, (_, row) in enumerate(ranked.iterrows(), start=1):
        harness_ids = by_number.get(int(row["number"]), [])
        if not harness_ids and is_finite(row.get("harness_trial")):
            harness_ids = [int(row["harness_trial"])]
        rows.append(
            (
                Cell(str(rank)),
                Cell(str(int(row["number"]))),
                Cell(", ".join(str(i) for i in sorted(harness_ids)) or MISSING),
                Cell(format_number(row["value"], decimals), bold=rank == 1),
                *(Cell(format_knob_value(plain_value(row.get(f"param_{p}")))) for p in params),
            )
        )
    return Table(
        columns=("rank", "Optuna trial", "harness trial", summary.axis_label, *params),
        rows=tuple(rows),
        numeric=(True, True, True, True, *(False for _ in params)),
    )


def importance_table(summary: SearchSummary) -> Table | None:
    if not summary.importances:
        return None
    return Table(
        columns=("parameter", "importance (fANOVA, normalized)"),
        rows=tuple((Cell(k), Cell(format_number(v, 3))) for k, v in summary.importances.items()),
        numeric=(False, True),
    )


# ---------------------------------------------------------------------------------------------
# Multi-objective searches


def pareto_numbers(summary: SearchSummary) -> list[int]:
    """The trial numbers on the Pareto front of a multi-objective search: complete trials with a
    finite value of every objective that no other such trial beats or equals on every objective
    while beating it on one. Computed from the history itself (Optuna's ``best_trials`` agrees; a
    test checks it), in increasing trial number."""
    history = summary.history
    columns = [objective_column(m) for m, _ in summary.objectives]
    if history.empty or any(c not in history.columns for c in columns):
        return []
    signs = [1.0 if maximize else -1.0 for _, maximize in summary.objectives]
    points: list[tuple[int, tuple[float, ...]]] = []
    for _, row in history.iterrows():
        values = [float(row[c]) for c in columns]
        if row["state"] == "complete" and all(math.isfinite(v) for v in values):
            points.append((int(row["number"]), tuple(s * v for s, v in zip(signs, values))))

    def dominated(point: tuple[float, ...]) -> bool:
        return any(
            all(o >= p for o, p in zip(other, point)) and other != point for _, other in points
        )

    return sorted(number for number, point in points if not dominated(point))


def pareto_table(summary: SearchSummary, data: ReportData) -> Table | None:
    """The trials on the Pareto front, by the first objective (best first), each objective in the
    report's units, and the searched parameters."""
    numbers = pareto_numbers(summary)
    if not numbers:
        return None
    history = summary.history.set_index("number")
    first = objective_column(summary.objectives[0][0])
    ordered = sorted(
        numbers, key=lambda n: (-history.loc[n, first] if summary.maximize else history.loc[n, first], n)
    )
    params = [p for p in summary.params if f"param_{p}" in history.columns]
    decimals = {}
    for metric, _ in summary.objectives:
        declared = METRICS.get(metric)
        values = list(history.loc[numbers, objective_column(metric)])
        decimals[metric] = metric_decimals(declared, values) if declared is not None else None
    rows = []
    for number in ordered:
        row = history.loc[number]
        trial = row.get("harness_trial")
        rows.append(
            (
                Cell(str(number)),
                Cell(str(int(trial)) if is_finite(trial) else MISSING),
                *(Cell(format_number(row[objective_column(m)], decimals[m])) for m, _ in summary.objectives),
                *(Cell(format_knob_value(plain_value(row.get(f"param_{p}")))) for p in params),
            )
        )
    return Table(
        columns=("Optuna trial", "harness trial", *(metric_label(m) for m, _ in summary.objectives), *params),
        rows=tuple(rows),
        numeric=(True, True, *(True for _ in summary.objectives), *(False for _ in params)),
    )
