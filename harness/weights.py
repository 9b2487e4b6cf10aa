"""``harness weights STUDY [--trial N | --best METRIC] [--copy DEST]``: the trained encoders of a
study, as recorded in the database (no torch import).

Without ``--trial``/``--best`` it lists the study's trials that have weights. With one of them it
prints the path of that trial's ``encoder.safetensors`` (one line, for scripts), or with ``--copy``
copies it and its ``encoder.json`` after checking the SHA-256 recorded with the trial.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from harness.db import DEFAULT_DB_PATH, Database, StudyRow, TrialRow, open_existing
from harness.metrics import METRICS, OBJECTIVE_METRICS

EXIT_USAGE = 2
EXIT_NOTHING = 1
WEIGHTS_INFO_NAME = "encoder.json"  # beside every encoder.safetensors (harness.checkpoint)


class WeightsProblem(Exception):
    """What the user asked for does not exist or cannot be given; ``exit_code`` says which."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class TrialWeights:
    """One trial's encoder as the database records it."""

    trial_id: int
    study: str
    status: str
    config: Mapping[str, Any]
    metrics: Mapping[str, float | None]
    path: Path | None
    sha256: str | None

    def check(self) -> Path:
        """The weights file, verified against the recorded SHA-256; WeightsProblem otherwise."""
        if self.path is None:
            why = (
                "it is not complete"
                if self.status != "complete"
                else "it was run with save_weights false, or before the harness saved weights"
            )
            raise WeightsProblem(
                f"trial #{self.trial_id} of {self.study} has no weights ({why})", EXIT_NOTHING
            )
        if not self.path.is_file():
            raise WeightsProblem(
                f"trial #{self.trial_id}: its weights {self.path} are gone (moved or deleted since the trial ran)",
                EXIT_NOTHING,
            )
        if self.sha256 is not None and file_sha256(self.path) != self.sha256:
            raise WeightsProblem(
                f"trial #{self.trial_id}: {self.path} changed since the trial recorded it (SHA-256 differs)",
                EXIT_NOTHING,
            )
        return self.path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def study_weights(db: Database, study: str) -> list[TrialWeights]:
    """Every trial of ``study`` (WeightsProblem for an unknown name), oldest first."""

    def query(session: Any) -> tuple[list[str], list[TrialRow]]:
        names = list(session.scalars(select(StudyRow.name).order_by(StudyRow.name)))
        rows = list(
            session.scalars(
                select(TrialRow).join(StudyRow).where(StudyRow.name == study).order_by(TrialRow.id)
            )
        )
        return names, rows

    names, rows = db.run(query)
    if study not in names:
        known = f" (studies: {', '.join(names)})" if names else " (the database has no studies)"
        raise WeightsProblem(f"no study named {study!r}{known}")
    return [_weights(row, study) for row in rows]


def trial_weights(db: Database, trial_id: int) -> TrialWeights:
    """One trial by its id (any study); WeightsProblem when there is none."""

    def query(session: Any) -> tuple[TrialRow, str] | None:
        found = session.execute(
            select(TrialRow, StudyRow.name).join(StudyRow).where(TrialRow.id == trial_id)
        ).one_or_none()
        return None if found is None else (found[0], found[1])

    found = db.run(query)
    if found is None:
        raise WeightsProblem(f"no trial #{trial_id} in the database")
    return _weights(*found)


def _weights(row: TrialRow, study: str) -> TrialWeights:
    return TrialWeights(
        trial_id=row.id,
        study=study,
        status=row.status,
        config=dict(row.config or {}),
        metrics={name: getattr(row, name) for name in OBJECTIVE_METRICS},
        path=Path(row.weights_path) if row.weights_path else None,
        sha256=row.weights_sha256,
    )


def best(trials: list[TrialWeights], metric: str) -> TrialWeights:
    """The complete trial with weights that is best by ``metric``, in its declared direction
    (``harness.metrics``); ties go to the older trial."""
    if metric not in OBJECTIVE_METRICS:
        raise WeightsProblem(f"--best {metric}: expected one of {', '.join(OBJECTIVE_METRICS)}")
    candidates = [
        t for t in trials if t.status == "complete" and t.path is not None and _finite(t.metrics.get(metric))
    ]
    if not candidates:
        raise WeightsProblem(f"no complete trial with weights and a {metric} value", EXIT_NOTHING)
    sign = -1.0 if METRICS[metric].higher_is_better else 1.0
    return min(candidates, key=lambda t: (sign * float(t.metrics[metric]), t.trial_id))  # type: ignore[arg-type]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == value and abs(value) != float("inf")


def copy_weights(trial: TrialWeights, destination: str | Path) -> tuple[Path, Path]:
    """Copy the trial's weights and JSON to ``destination``: into it when it is a folder (or ends
    with a slash), else to that file name with the JSON beside it (``NAME.json``)."""
    source = trial.check()
    info = source.with_name(WEIGHTS_INFO_NAME)
    into_folder = str(destination).endswith(("/", os.sep))
    destination = Path(destination)
    into_folder = into_folder or destination.is_dir()
    target = destination / source.name if into_folder else destination
    info_target = target.with_name(WEIGHTS_INFO_NAME) if into_folder else target.with_suffix(".json")
    if target.resolve() == source.resolve():
        raise WeightsProblem(f"--copy {destination}: that is the trial's own file")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    if info.is_file():
        shutil.copyfile(info, info_target)
    return target, info_target


# ----------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY", help="the study's name, as stored in the database")
    parser.add_argument(
        "--db", default=None, help=f"SQLAlchemy URL or SQLite path (default {DEFAULT_DB_PATH})"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--trial", type=int, metavar="N", help="the trial with id N (as `harness status` shows it)"
    )
    which.add_argument(
        "--best",
        metavar="METRIC",
        help=f"the complete trial best by METRIC ({', '.join(OBJECTIVE_METRICS)})",
    )
    parser.add_argument(
        "--copy",
        metavar="DEST",
        help="copy the weights (and encoder.json) to DEST, a file name or a folder",
    )


def main(args: argparse.Namespace) -> int:
    try:
        db = open_existing(args.db)
    except FileNotFoundError as error:
        return _fail(str(error), EXIT_USAGE)
    try:
        return _run(db, args)
    except WeightsProblem as problem:
        return _fail(str(problem), problem.exit_code)
    finally:
        db.dispose()


def _run(db: Database, args: argparse.Namespace) -> int:
    trials = study_weights(db, args.study)
    if args.trial is None and args.best is None:
        if args.copy is not None:
            raise WeightsProblem("--copy needs --trial N or --best METRIC (which trial's weights)")
        with_weights = [t for t in trials if t.path is not None]
        if not with_weights:
            print(f"{args.study}: no trial has weights yet ({len(trials)} trial(s))")
            return 0
        print(f"{args.study}: {len(with_weights)} of {len(trials)} trial(s) have weights")
        for trial in with_weights:
            knn = trial.metrics.get("knn_top1")
            shown = f"knn_top1 {knn:.4f}" if _finite(knn) else "knn_top1 -"
            print(
                f"  #{trial.trial_id} {trial.config.get('method')} seed {trial.config.get('seed')}: {shown}  {trial.path}"
            )
        return 0
    if args.trial is not None:
        chosen = next((t for t in trials if t.trial_id == args.trial), None)
        if chosen is None:
            raise WeightsProblem(f"--trial {args.trial}: no such trial in study {args.study}")
    else:
        chosen = best(trials, args.best)
    if args.copy is None:
        print(chosen.check())
        return 0
    target, info = copy_weights(chosen, args.copy)
    print(f"copied trial #{chosen.trial_id}'s weights to {target} (and {info.name})")
    return 0


def _fail(message: str, code: int) -> int:
    print(f"harness weights: {message}", file=sys.stderr)
    return code
