"""The ``harness`` command: run, status, report, evaluate, bench, export, data.

``report`` and ``bench`` live in their own packages and are imported only when used, so that
``harness --help`` and ``harness status`` stay fast and work even if one of them is broken.
This module imports only the standard library at import time: everything else is imported
inside ``main``, where Ctrl-C during start-up is one line ("interrupted"), not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

DESCRIPTION = (
    "Benchmark and ablation harness for self-supervised representation learning. A study file "
    "(YAML) declares what to compare; `harness run` trains one trial per configuration and records "
    "everything in a SQL database; `harness report` turns the database into tables and plots."
)

_DELEGATED: dict[str, tuple[str, str, str]] = {
    # command: (module, one-line help, description)
    "report": (
        "harness.reports.cli",
        "tables and plots of a study, from the database alone",
        "Write a study's comparison tables and ablation plots from the database.",
    ),
    "weights": (
        "harness.weights",
        "the trained encoders of a study: list them, print one's path, or copy it",
        "List the trials of a study that have weights (encoder.safetensors + encoder.json), or "
        "print the path of one (--trial N, or --best METRIC), or copy it (--copy DEST).",
    ),
    "evaluate": (
        "harness.study.evaluate",
        "run evaluation protocols (fine-tune, label fractions, few-shot, transfer) on saved encoders",
        "Run the evaluate: section of a study (or of --file) on the saved encoders of its complete "
        "trials, without retraining; each result is stored with its protocol.",
    ),
    "db": (
        "harness.db.cli",
        "the database's schema version; upgrade an older database in place",
        "Show a results database's schema version, or upgrade one written by an older harness in "
        "place (docs/DATABASE.md). `harness run` upgrades automatically; status, report and export "
        "only read, and ask for this step.",
    ),
    "bench": (
        "harness.bench.cli",
        "loss-kernel microbenchmarks, stored and compared to a saved baseline",
        "Time the loss kernels (reference and fast implementations), store the results and "
        "compare them to a saved baseline with a regression gate.",
    ),
    "data": (
        "harness.data.cli",
        "prepare image-folder datasets as memory-mappable shards, and inspect them",
        "Decode an image folder (imagefolder, imagenet100) once into uint8 shards at a chosen "
        "resolution, where trials look for them; or show whether they are prepared and up to date.",
    ),
}


def version_text() -> str:
    """``harness 0.1.0`` (the installed distribution's version, from pyproject.toml), plus the git
    commit of the checkout the package runs from, when it is one (``+dirty`` for local changes)."""
    from importlib.metadata import PackageNotFoundError, version

    from harness.provenance import git_state

    try:
        text = f"harness {version('harness')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        text = "harness (not installed)"
    commit, dirty = git_state()
    if commit:
        text += f" (git {commit[:12]}{'+dirty' if dirty else ''})"
    return text


class _VersionAction(argparse.Action):
    """argparse's "version" action, computing the text only when asked (it runs git)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(version_text())
        parser.exit()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, found {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, found {text!r}")
    return value


def _slurm_time(text: str) -> str:
    from harness.study.slurm import time_minutes

    try:
        time_minutes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, found {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, found {text!r}")
    return value


def _device(text: str) -> str:
    from harness.spec import check_knob

    expected = check_knob("device", text)
    if expected is not None:
        raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}")
    return text


def _add_db(parser: argparse.ArgumentParser) -> None:
    from harness.db import DEFAULT_DB_PATH

    parser.add_argument(
        "--db",
        metavar="URL",
        default=None,
        help=f"database: a SQLAlchemy URL (postgresql://...) or a SQLite file path (default: {DEFAULT_DB_PATH})",
    )


def build_parser() -> argparse.ArgumentParser:
    from harness.spec import DEFAULT_TRIAL_LIMIT, TRACKERS
    from harness.study.runner import DEFAULT_HEARTBEAT_TIMEOUT

    parser = argparse.ArgumentParser(prog="harness", description=DESCRIPTION)
    parser.add_argument("--version", action=_VersionAction, help="print the version and git commit, and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run a study file: insert its trials, claim and train them, record the results",
        description=(
            "Validate STUDY.yaml, add its trials to the database (new points of a changed file are "
            "added, existing results kept) and run every trial that has no result yet. Idempotent: "
            "run it again to resume; several `harness run` processes on one study share the work. "
            "A search: runs the Optuna study stored in the same database."
        ),
    )
    run.add_argument("study", metavar="STUDY.yaml", help="the study file")
    _add_db(run)
    run.add_argument(
        "--device", type=_device, help="run every trial on this device (auto, cpu, cuda, cuda:N)"
    )
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="worker processes on this machine, each claiming trials (one per GPU where there are several)",
    )
    run.add_argument(
        "--force-workers",
        action="store_true",
        help="run --workers N even when N is more than this machine's CUDA devices (or CPU cores)",
    )
    run.add_argument(
        "--max-trials", type=_positive_int, metavar="N", help="stop after this command ran N trials"
    )

    run.add_argument(
        "--dry-run", action="store_true", help="print the expanded trials and notes; write nothing"
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the study file (repeatable): KNOB=VALUE sets fixed.KNOB, a dotted path any key "
        "(search.n_trials=4), VALUE is YAML; the run is then a separate study, NAME.set.KEY-VALUE "
        "(or --set study=NAME)",
    )
    run.add_argument(
        "--trial-limit",
        type=_positive_int,
        default=DEFAULT_TRIAL_LIMIT,
        metavar="N",
        help=f"refuse a study file that expands to more than N trials, counted before expanding (default: {DEFAULT_TRIAL_LIMIT:,})",
    )
    run.add_argument(
        "--mlflow",
        nargs="?",
        const=TRACKERS["mlflow"],
        metavar="URI",
        help="mirror each trial to MLflow (a run per trial: params, curves, summary): a tracking URI, or "
        "a folder for a local store (default: mlruns/, as sqlite:///mlruns/mlflow.db); needs the "
        "tracking extra",
    )
    run.add_argument(
        "--tensorboard",
        nargs="?",
        const=TRACKERS["tensorboard"],
        metavar="DIR",
        help="write TensorBoard events, one directory per trial under DIR/STUDY/ (default: runs/); "
        "needs the tracking extra",
    )
    run.add_argument(
        "--retry-failed",
        action="store_true",
        help="rerun trials that failed (by default a failure is a result)",
    )
    run.add_argument(
        "--heartbeat-timeout",
        type=_positive_seconds,
        default=DEFAULT_HEARTBEAT_TIMEOUT,
        metavar="SECONDS",
        help=f"a running trial without a heartbeat for this long is taken over and rerun (default: {DEFAULT_HEARTBEAT_TIMEOUT:g})",
    )
    run.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        default=None,
        help="where trials keep checkpoints and weights, a folder per study and trial (default: the "
        "checkpoint_dir knob, else beside the database: results/harness-checkpoints/ for results/harness.db)",
    )
    progress = run.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="show progress bars"
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    launch = run.add_argument_group(
        "Slurm", "--launcher slurm: submit the workers as a Slurm job array (docs/SCALING.md; needs PostgreSQL)"
    )
    launch.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="local: run the workers here (default); slurm: submit --jobs Slurm jobs, each one worker",
    )
    launch.add_argument("--jobs", type=_positive_int, default=1, metavar="K", help="Slurm jobs (one array; default 1)")
    launch.add_argument("--partition", metavar="P", help="Slurm partition (default: the cluster's)")
    launch.add_argument(
        "--gpus-per-job", type=_non_negative_int, default=0, metavar="G", help="GPUs per job (default 0)"
    )
    launch.add_argument("--cpus-per-job", type=_positive_int, metavar="C", help="CPUs per job (default: the cluster's)")
    launch.add_argument(
        "--time",
        type=_slurm_time,
        default=None,
        metavar="T",
        help="time limit per job, in Slurm's format (MINUTES, HH:MM:SS, D-HH:MM:SS; default 4:00:00); "
        "a job near its limit hands its trial back and is requeued",
    )
    launch.add_argument("--mem", metavar="M", help="memory per job, in Slurm's format (16G, 4000M)")
    launch.add_argument(
        "--slurm-folder", metavar="DIR", help="where submitit keeps job logs and pickles (default results/slurm/STUDY)"
    )
    run.set_defaults(handler=_cmd_run)

    status = commands.add_parser(
        "status",
        help="trial counts per status, the best trials, failures with reasons",
        description="Summarize one study (or every study): counts per status, the best trials by the "
        "objective, failures with their reasons, and the trials running now.",
    )
    status.add_argument("study", metavar="STUDY", nargs="?", help="a study name (default: every study)")
    _add_db(status)
    status.add_argument(
        "--top",
        type=_positive_int,
        default=None,
        metavar="K",
        help="best trials shown per study (default: 5 for one study, 3 each for every study)",
    )
    status.set_defaults(handler=_cmd_status)

    cancel = commands.add_parser(
        "cancel",
        help="cancel a study's Slurm jobs (their running trials are handed back)",
        description="scancel the Slurm jobs that `harness run --launcher slurm` submitted for STUDY and "
        "that are still queued or running; each running job hands its trial back as pending.",
    )
    cancel.add_argument("study", metavar="STUDY", help="the study name")
    _add_db(cancel)
    cancel.set_defaults(handler=_cmd_cancel)

    for name, (_, help_text, description) in _DELEGATED.items():
        # Their own arguments are added when the command runs (see _delegate): importing them
        # here would make every command pay for (and depend on) them.
        commands.add_parser(name, help=help_text, description=description, add_help=False)

    export = commands.add_parser(
        "export",
        help="write a study's trials (one row per trial) as CSV or Parquet",
        description="Write the trials DataFrame of a study (identity, status, provenance, summary "
        "metrics and one column per knob) to a file.",
    )
    export.add_argument("study", metavar="STUDY", help="the study name")
    _add_db(export)
    export.add_argument(
        "--format", choices=("csv", "parquet"), default="csv", help="file format (default: csv)"
    )
    export.add_argument("--out", metavar="PATH", help="output file (default: results/STUDY.csv or .parquet)")
    export.set_defaults(handler=_cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in _DELEGATED:
            return _delegate(args[0], args[1:])
        parsed = build_parser().parse_args(args)
        handler: Callable[[argparse.Namespace], int] = parsed.handler
        return handler(parsed)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `harness status | head`: the reader left; say nothing more, and keep Python's exit-time
        # flush of stdout from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _error(command: str, message: str, code: int) -> int:
    print(f"harness {command}: {message}", file=sys.stderr)
    return code


def _delegate(command: str, rest: list[str]) -> int:
    module_name, _, description = _DELEGATED[command]
    try:
        module: ModuleType = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            return _error(command, f"not available yet: {module_name} does not exist", 2)
        return _error(command, f"not available: importing {module_name} failed: {error}", 2)
    except Exception as error:  # a broken sibling package must not take the whole CLI down
        return _error(
            command, f"not available: importing {module_name} failed: {type(error).__name__}: {error}", 2
        )
    if not hasattr(module, "add_arguments") or not hasattr(module, "main"):
        return _error(command, f"not available yet: {module_name} has no add_arguments/main", 2)
    parser = argparse.ArgumentParser(prog=f"harness {command}", description=description)
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(rest)) or 0)


def _cmd_run(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from harness.db import SCHEMA_VERSION, DatabaseProblem, NoHarnessTables, NotPersistent, require_persistent
    from harness.overrides import load_study_with_overrides
    from harness.spec import SpecError
    from harness.study import (
        RunOptions,
        SearchSetupError,
        StudyConflict,
        dry_run_lines,
        open_existing,
        run_study,
        search_problems,
    )
    from harness.study.store import check_kind, existing_rows

    try:
        study, overrides = load_study_with_overrides(args.study, args.overrides, max_trials=args.trial_limit)
        problems = search_problems(study)
        if problems:
            raise SpecError(problems)
    except SpecError as error:
        print(error, file=sys.stderr)
        return 2
    except RecursionError:  # absurdly deep YAML nesting, which the parser cannot handle
        print(SpecError([f"{args.study}: the YAML is nested too deeply to read"]), file=sys.stderr)
        return 2
    if overrides:
        from harness.overrides import changes_results

        given = ", ".join(f"{o.key}={o.value_text}" for o in overrides)
        if any(changes_results(o) for o in overrides) or any(o.path == ("study",) for o in overrides):
            print(f"overrides: {given}; running them as study {study.name} (the file's own study is not touched)", flush=True)
        else:
            print(
                f"overrides: {given}; they change how trials run, not their results, so this is study "
                f"{study.name} itself: its finished trials are kept and the pending ones run with them",
                flush=True,
            )
    from harness.spec import DEFAULTS

    wanted_device = args.device or study.fixed.get("device", DEFAULTS.device)
    if not args.dry_run:
        # Importing torch and probing the device take seconds: say so rather than sit silent.
        print(f"study {study.name}: loading torch and checking device {wanted_device} ...", flush=True)
    from harness.runtime import device_problem

    problem = device_problem(wanted_device)
    if problem is not None:
        where = "--device" if args.device else f"{args.study}: fixed.device"
        return _error("run", f"{where}: {problem}; nothing was run or written", 2)
    launcher_problem = _launcher_problem(args) or _ranks_problem(study, args)
    if launcher_problem:
        return _error("run", launcher_problem, 2)
    if not args.dry_run and args.launcher == "local" and args.workers == 1:
        # This process trains: load the training code (torch's decompositions, ~0.4 s) now, while
        # "loading torch" is on screen, rather than after the study is announced. A Ctrl-C that
        # lands inside torch's own imports can be swallowed by them, so the fewer of those run
        # after the announcement, the more reliably a Ctrl-C then hands the study back.
        import harness.train  # noqa: F401
    if args.dry_run:
        existing = None
        try:
            db = open_existing(args.db, allow_older=True)
        except (FileNotFoundError, NoHarnessTables, NotPersistent):  # nothing yet: every trial is new
            db = None
        except Exception as error:  # what the real run would refuse (another program's tables, ...)
            return _database_error("run", error)
        if db is not None:
            if db.state.pending:
                print(
                    f"note: the run will upgrade the database from schema version {db.state.version} "
                    f"to {SCHEMA_VERSION} (docs/DATABASE.md)"
                )
            try:
                check_kind(db, study)  # what the real run would refuse, the dry run refuses too
                existing = existing_rows(db, study.name)
            except StudyConflict as error:
                return _error("run", str(error), 2)
            except Exception:  # not one of ours yet: every trial is new
                existing = None
            finally:
                db.dispose()
        for line in dry_run_lines(study, existing):
            print(line)
        if args.launcher == "slurm":
            from harness.study.slurm import sbatch_lines

            for line in sbatch_lines(study, _slurm_options(args)):
                print(line)
        return 0
    try:
        require_persistent(args.db, "`harness run`")
    except DatabaseProblem as error:
        return _database_error("run", error)

    from harness.tracking import TrackingSettings, missing_packages

    tracking = TrackingSettings(**dict(study.tracking)).merged(
        TrackingSettings(mlflow=args.mlflow, tensorboard=args.tensorboard)
    )
    for missing in missing_packages(tracking):
        print(f"warning: tracking is on but {missing} is not installed; trials run without it", flush=True)
    options = RunOptions(
        tracking=tracking if tracking.enabled else None,
        db=args.db,
        device=args.device,
        workers=args.workers,
        max_trials=args.max_trials,
        retry_failed=args.retry_failed,
        force_workers=args.force_workers,
        heartbeat_timeout=args.heartbeat_timeout,
        progress=args.progress,
        checkpoint_dir=args.checkpoint_dir,
    )
    if args.launcher == "slurm":
        return _submit_slurm(study, options, args)
    try:
        from harness.study.progress import StudyProgress

        result = run_study(study, options, events=(StudyProgress(options.workers),))
        code = result.exit_code
        # After an interrupted run (Ctrl-C, SIGTERM) the user asked to stop: no evaluations then.
        if study.evaluate is not None and args.max_trials is None and not result.tally.interrupted:
            code = max(code, _evaluate_after_run(study, args))
        return code
    except (StudyConflict, SearchSetupError) as error:
        return _error("run", str(error), 2)
    except (DatabaseProblem, SQLAlchemyError, ImportError) as error:  # not ours, unreachable, no driver
        return _database_error("run", error)


def _slurm_options(args: argparse.Namespace) -> Any:
    from harness.study.slurm import DEFAULT_TIME, SlurmOptions

    return SlurmOptions(
        jobs=args.jobs,
        partition=args.partition,
        gpus_per_job=args.gpus_per_job,
        cpus_per_job=args.cpus_per_job,
        time=args.time or DEFAULT_TIME,
        mem=args.mem,
        folder=Path(args.slurm_folder) if args.slurm_folder else None,
    )


_SLURM_ONLY = {
    "jobs": 1,
    "partition": None,
    "gpus_per_job": 0,
    "cpus_per_job": None,
    "time": None,
    "mem": None,
    "slurm_folder": None,
}


def _launcher_problem(args: argparse.Namespace) -> str | None:
    """Arguments that do not go together with the chosen launcher (nothing is written then)."""
    if args.launcher == "local":
        given = [f"--{name.replace('_', '-')}" for name, unset in _SLURM_ONLY.items() if getattr(args, name) != unset]
        return f"{', '.join(given)}: only with --launcher slurm" if given else None
    from harness.study.slurm import sqlite_refusal

    if args.workers != 1:
        return "--workers: with --launcher slurm each job is one worker; use --jobs K"
    if args.max_trials is not None:
        return "--max-trials cannot be shared by Slurm jobs; leave it out with --launcher slurm"
    return sqlite_refusal(args.db)


def _ranks_problem(study: Any, args: argparse.Namespace) -> str | None:
    """``--workers N`` with trials of ``devices_per_trial`` > 1: both place processes on devices
    (worker i on cuda:i, a trial's ranks on cuda:B to cuda:B+N-1), so together they would share
    GPUs, or oversubscribe the cores; refused before anything is written."""
    if args.workers <= 1:
        return None
    values = [study.fixed.get("devices_per_trial", 1), *(p.get("devices_per_trial", 1) for p in study.points)]
    widest = max(v for v in values if isinstance(v, int))
    if widest <= 1:
        return None
    return (
        f"--workers {args.workers}: {args.study} runs trials on devices_per_trial = {widest} processes each; "
        "use one worker (a trial's ranks already use the devices), or lower devices_per_trial"
    )


def _submit_slurm(study: Any, options: Any, args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from harness.db import DatabaseProblem
    from harness.study import SearchSetupError, StudyConflict
    from harness.study.slurm import SlurmSetupError, submit

    try:
        submit(study, options, _slurm_options(args), echo=lambda line: print(line, flush=True))
    except (SlurmSetupError, StudyConflict, SearchSetupError) as error:
        return _error("run", str(error), 2)
    except (DatabaseProblem, SQLAlchemyError, ImportError) as error:
        return _database_error("run", error)
    except Exception as error:  # sbatch refused the job (submitit raises a plain error with its output)
        return _error("run", f"submitting to Slurm failed: {type(error).__name__}: {error}", 1)
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from harness.db import DatabaseProblem
    from harness.study import open_existing
    from harness.study.slurm import SlurmSetupError, cancel

    try:
        db = open_existing(args.db)
        try:
            cancel(db, args.study)
        finally:
            db.dispose()
    except (LookupError, SlurmSetupError) as error:
        return _error("cancel", str(error), 2)
    except (FileNotFoundError, DatabaseProblem, SQLAlchemyError, ImportError) as error:
        return _database_error("cancel", error)
    return 0


def _evaluate_after_run(study: Any, args: argparse.Namespace) -> int:
    """The study's evaluate: section on its complete trials' saved encoders (what `harness evaluate
    STUDY` does); results already stored are not computed again."""
    from harness.study import open_existing
    from harness.study.evaluate import run_evaluations

    db = open_existing(args.db)
    try:
        device = args.device or study.fixed.get("device", "auto")
        report = run_evaluations(db, study.name, study.evaluate, device=device)
    finally:
        db.dispose()
    for trial_id, reason in report.unavailable:
        print(f"harness run: trial {trial_id} cannot be evaluated: {reason}", file=sys.stderr)
    return report.exit_code


def _database_error(command: str, error: BaseException) -> int:
    """One line and the exit status every command gives for the same database problem."""
    from harness.db import describe

    described = describe(error)
    if described is None:
        raise error
    return _error(command, *described)


def _cmd_status(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from harness.db import DatabaseProblem
    from harness.study import UnknownStudy, open_existing, status_lines

    try:
        db = open_existing(args.db)
        lines = status_lines(db, args.study, top=args.top)
    except UnknownStudy as error:
        return _error("status", str(error), 2)
    except (FileNotFoundError, DatabaseProblem, SQLAlchemyError, ImportError) as error:
        return _database_error("status", error)
    print("\n".join(lines))
    db.dispose()
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import json

    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from harness.db import DatabaseProblem, StudyRow
    from harness.results import trials_frame
    from harness.runtime import output_problem, write_atomically
    from harness.study import open_existing

    suffix = Path(args.out).suffix.lower() if args.out else ""
    other = {"csv": ".parquet", "parquet": ".csv"}[args.format]
    if suffix == other:
        return _error("export", f"--out {args.out}: a {args.format} file would get a {suffix} name; "
                      f"expected --format {other[1:]} or another file name", 2)
    out = Path(args.out) if args.out else Path("results") / f"{args.study}.{args.format}"
    problem = output_problem(out, folder=False)
    if problem is not None:
        where = "--out" if args.out else "the study name is the file name (give --out PATH):"
        return _error("export", f"{where} {problem[0]}", problem[1])
    try:
        db = open_existing(args.db)
        known = db.run(lambda s: list(s.scalars(select(StudyRow.name).order_by(StudyRow.name))))
        if args.study not in known:
            return _error(
                "export",
                f"no study named {args.study!r}" + (f" (studies: {', '.join(known)})" if known else ""),
                2,
            )
        frame = trials_frame(db, args.study)
    except (DatabaseProblem, SQLAlchemyError, ImportError, FileNotFoundError) as error:
        return _database_error("export", error)
    # One JSON text per trial: CSV would otherwise get Python's repr, Parquet a struct whose
    # fields (class names) differ between datasets.
    frame["data"] = [json.dumps(d, sort_keys=True) if isinstance(d, dict) else None for d in frame["data"]]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.format == "parquet":
            write_atomically(out, lambda path: frame.to_parquet(path, index=False))
        else:
            write_atomically(out, lambda path: frame.to_csv(path, index=False))
    except OSError as error:
        return _error("export", f"{out}: cannot write it ({error.strerror or error})", 1)
    print(f"wrote {len(frame)} trial(s) of {args.study} to {out}")
    db.dispose()
    return 0
