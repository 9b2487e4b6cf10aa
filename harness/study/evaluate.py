"""``harness evaluate STUDY``: run the study's evaluation protocols (its ``evaluate:`` section, or
another file's) on the saved encoders of its complete trials, without retraining any of them.

Each result is one ``harness_evaluation`` row (unique per trial and task), written as soon as it is
measured, so an interrupted run keeps what it finished and a second run does only what is missing;
a failed evaluation is a row with its reason, retried by the next run. A trial whose weights cannot
be loaded (a study trained before checkpoints existed, a deleted folder, a changed file) is
reported with the reason and left out; nothing is written for it.

Importing this module imports no torch: the protocols are imported when work starts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from harness.db import Database, EvaluationRow, StudyRow, TrialRow, describe, sqlite_file, utcnow
from harness.protocol_spec import EvaluationPlan, Task, parse_evaluate
from harness.spec import DATASET_NAMES, UNTRAINED_METHODS, _StudyLoader

EncoderLoader = Callable[[Database, int, str], Any]


class EvaluationSetupError(ValueError):
    """No plan to run, an unknown study or an unreadable file: nothing was evaluated."""


def task_hash(task: Task) -> str:
    return hashlib.sha256(task.key.encode()).hexdigest()


@dataclass(frozen=True)
class TrialInfo:
    trial_id: int
    method: str
    seed: int
    config: dict[str, Any]


@dataclass
class EvaluationReport:
    """What one ``harness evaluate`` did."""

    evaluated: list[tuple[int, str, str]] = field(default_factory=list)  # (trial, task label, result)
    failed: list[tuple[int, str, str]] = field(default_factory=list)  # (trial, task label, reason)
    unavailable: list[tuple[int, str]] = field(default_factory=list)  # (trial, why its weights cannot load)
    already: int = 0  # results that were already stored

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.unavailable else 0


def plan_from_text(text: str, source: str) -> EvaluationPlan | None:
    """The ``evaluate:`` section of a study file's text; None when it has none."""
    try:
        # The study files' loader: YAML 1.2 floats (1e-2 is a number) and no repeated keys.
        data = yaml.load(text, Loader=_StudyLoader)
    except yaml.YAMLError as error:
        raise EvaluationSetupError(f"{source}: not readable as YAML: {error}") from None
    if not isinstance(data, dict) or data.get("evaluate") is None:
        return None
    plan, problems = parse_evaluate(data["evaluate"], datasets=DATASET_NAMES)
    if problems:
        raise EvaluationSetupError(
            "\n".join([f"{len(problems)} problem(s) in the evaluate: section of {source}:"]
                      + [f"  - {source}: {path}: {message}" for path, message in problems])
        )
    return plan


def task_label(task: Task) -> str:
    parts = [task.protocol]
    if task.dataset is not None:
        parts.append(f"on {task.dataset}")
    if task.fraction is not None:
        parts.append(f"{100 * task.fraction:g}% labels")
    if task.shots is not None:
        parts.append(f"{task.shots}-shot")
    return " ".join(parts)


def study_trials(db: Database, study: str) -> tuple[str, list[TrialInfo]]:
    """The stored study file and the complete trials of ``study``."""

    def query(session: Any) -> tuple[str, list[TrialInfo]] | None:
        row = session.scalars(select(StudyRow).where(StudyRow.name == study)).first()
        if row is None:
            return None
        trials = session.scalars(
            select(TrialRow).where(TrialRow.study_id == row.id, TrialRow.status == "complete").order_by(TrialRow.id)
        )
        return row.file_text or "", [
            TrialInfo(t.id, str((t.config or {}).get("method", "?")), int(t.seed), dict(t.config or {})) for t in trials
        ]

    found = db.run(query)
    if found is None:
        names = db.run(lambda s: list(s.scalars(select(StudyRow.name).order_by(StudyRow.name))))
        raise EvaluationSetupError(
            f"no study named {study!r} in the database; known studies: {', '.join(names) if names else 'none'}"
        )
    return found


def _stored(db: Database, trial_ids: list[int]) -> dict[tuple[int, str], str]:
    """(trial, task hash) -> status of the evaluations already stored."""

    def query(session: Any) -> dict[tuple[int, str], str]:
        rows = session.execute(
            select(EvaluationRow.trial_id, EvaluationRow.task_hash, EvaluationRow.status).where(
                EvaluationRow.trial_id.in_(trial_ids)
            )
        )
        return {(int(t), str(h)): str(s) for t, h, s in rows}

    return db.run(query) if trial_ids else {}


def _write(db: Database, trial_id: int, task: Task, config: dict[str, Any], values: dict[str, Any]) -> bool:
    """Store one result (replacing a failed one of the same task); False when another process
    stored it first."""
    digest = task_hash(task)

    def insert(session: Any) -> None:
        session.execute(
            delete(EvaluationRow).where(
                EvaluationRow.trial_id == trial_id,
                EvaluationRow.task_hash == digest,
                EvaluationRow.status != "complete",
            )
        )
        session.add(
            EvaluationRow(
                trial_id=trial_id,
                task_hash=digest,
                task=json.loads(task.key),
                protocol=task.protocol,
                dataset=task.dataset or str(config.get("dataset")),
                transfer=task.dataset is not None,
                fraction=task.fraction,
                shots=task.shots,
                label_seed=task.label_seed,
                created_at=utcnow(),
                **values,
            )
        )

    try:
        db.run(insert)
    except IntegrityError:
        return False
    return True


def default_loader(db: Database, trial_id: int, device: str) -> Any:
    """The trial's saved encoder (``harness.results.load_encoder``)."""
    from harness import results

    loader = getattr(results, "load_encoder", None)
    if loader is None:
        raise RuntimeError("this harness cannot load saved encoders (harness.results.load_encoder is missing)")
    encoder = loader(db, trial_id, device=device)
    return getattr(encoder, "module", encoder)


def run_evaluations(
    db: Database,
    study: str,
    plan: EvaluationPlan,
    *,
    device: str = "auto",
    loader: EncoderLoader = default_loader,
    trial_ids: set[int] | None = None,
    echo: Callable[[str], None] = print,
) -> EvaluationReport:
    """Run every task of ``plan`` that a complete trial of ``study`` lacks (see the module doc)."""
    from harness import protocols, provenance
    from harness.train import resolve_device

    _, trials = study_trials(db, study)
    if trial_ids is not None:
        trials = [t for t in trials if t.trial_id in trial_ids]
    tasks = plan.tasks()
    stored = _stored(db, [t.trial_id for t in trials])
    report = EvaluationReport()
    resolved = resolve_device(device)
    where = provenance.collect(str(resolved))
    for trial in trials:
        todo = [task for task in tasks if stored.get((trial.trial_id, task_hash(task))) != "complete"]
        report.already += len(tasks) - len(todo)
        if not todo:
            continue
        name = f"trial {trial.trial_id} ({trial.method}, seed {trial.seed})"
        try:
            encoder = loader(db, trial.trial_id, str(resolved))
        except Exception as error:  # no weights: said, not written, the others go on
            reason = f"{type(error).__name__}: {error}"
            report.unavailable.append((trial.trial_id, reason))
            echo(f"{name}: cannot be evaluated: {reason}")
            continue
        for task in todo:
            label = task_label(task)
            try:
                result = protocols.run_task(
                    task, encoder, trial.config, device=resolved, from_scratch=trial.method in UNTRAINED_METHODS
                )
                values: dict[str, Any] = {
                    "status": "complete",
                    "reason": None,
                    "top1": result.top1,
                    "top5": result.top5,
                    "spread": result.spread,
                    "epochs": result.epochs,
                    "lr": result.lr,
                    "n_train": result.n_train,
                    "n_test": result.n_test,
                    "details": result.details,
                    "seconds": result.seconds,
                }
                text = f"top-1 {100 * result.top1:.1f}%" if result.top1 is not None else "stored"
                text += f" ({result.seconds:.1f} s)"
            except KeyboardInterrupt:
                raise
            except Exception as error:  # a failed evaluation is a result with a reason
                frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
                at = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame else ""
                values = {"status": "failed", "reason": f"{type(error).__name__}: {error}{at}"}
                text = f"failed: {values['reason']}"
            values.update({k: where.get(k) for k in ("git_commit", "git_dirty", "torch_version", "cuda_version", "device_name", "host")})
            if not _write(db, trial.trial_id, task, trial.config, values):
                report.already += 1
                continue
            (report.failed if values["status"] == "failed" else report.evaluated).append(
                (trial.trial_id, label, text)
            )
            echo(f"{name}: {label}: {text}")
    return report


# ---------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY", help="the study name in the database")
    parser.add_argument(
        "--db", metavar="URL", default=None, help="database: a SQLAlchemy URL or a SQLite file path (default: results/harness.db)"
    )
    parser.add_argument(
        "--file",
        metavar="STUDY.yaml",
        help="take the evaluate: section from this file (default: the study file stored with the study)",
    )
    parser.add_argument("--device", default="auto", help="device for the evaluations (auto, cpu, cuda, cuda:N)")
    parser.add_argument(
        "--trial", type=int, action="append", metavar="ID", help="only this trial (repeatable)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list what would be evaluated; load nothing, write nothing"
    )


def main(args: argparse.Namespace) -> int:
    path = sqlite_file(args.db)
    if path is not None and not path.exists():
        print(f"harness evaluate: no database at {path} (check the path; `harness run STUDY.yaml` creates one)", file=sys.stderr)
        return 2
    try:
        # It writes: a database of an older schema is upgraded in place, as `harness run` does.
        db = Database(args.db)
    except Exception as error:
        described = describe(error)
        if described is None:
            raise
        print(f"harness evaluate: {described[0]}", file=sys.stderr)
        return described[1]
    try:
        stored_text, trials = study_trials(db, args.study)
        if args.file:
            path = Path(args.file)
            if not path.is_file():
                raise EvaluationSetupError(f"--file {args.file}: no such file")
            plan = plan_from_text(path.read_text(encoding="utf-8"), args.file)
            source = args.file
        else:
            plan = plan_from_text(stored_text, f"the stored study file of {args.study}")
            source = "the stored study file"
        if plan is None:
            raise EvaluationSetupError(
                f"{source} has no evaluate: section; add one, or give a file that has one with --file"
            )
    except EvaluationSetupError as error:
        print(f"harness evaluate: {error}", file=sys.stderr)
        return 2
    if not trials:
        print(f"harness evaluate: study {args.study!r} has no complete trial to evaluate", file=sys.stderr)
        return 1
    wanted = set(args.trial) if args.trial else None
    if args.dry_run:
        tasks = plan.tasks()
        stored = _stored(db, [t.trial_id for t in trials])
        for trial in trials:
            if wanted is not None and trial.trial_id not in wanted:
                continue
            missing = [task_label(t) for t in tasks if stored.get((trial.trial_id, task_hash(t))) != "complete"]
            print(f"trial {trial.trial_id} ({trial.method}, seed {trial.seed}): "
                  + (", ".join(missing) if missing else "nothing to do"))
        return 0
    report = run_evaluations(db, args.study, plan, device=args.device, trial_ids=wanted)
    print(
        f"{len(report.evaluated)} evaluation(s) stored, {len(report.failed)} failed, "
        f"{report.already} already stored, {len(report.unavailable)} trial(s) without usable weights"
    )
    for trial_id, reason in report.unavailable:
        print(f"  trial {trial_id} cannot be evaluated: {reason}", file=sys.stderr)
    db.dispose()
    return report.exit_code
