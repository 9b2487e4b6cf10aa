"""A study's workers as Slurm jobs: ``harness run STUDY.yaml --launcher slurm --jobs K``.

The study is registered here (as ``harness run`` does), then K jobs are submitted as one job array
through submitit (the ``slurm`` extra). Each job is one worker running ``worker.run_worker``, the
same claim/heartbeat/exactly-once loop as a local worker, against the shared PostgreSQL database,
until no trial is left. Nothing is scheduled by the harness itself: Slurm decides where and when
the jobs run, the database decides which trial each one runs.

Signals, in a job:

- SIGTERM (``scancel``, ``harness cancel``, a preemption that kills): the running trial is handed
  back as pending (the worker's ordinary interrupt path) and the job ends. Slurm itself requeues
  a preempted job when the cluster's ``PreemptMode`` says REQUEUE.
- SIGUSR2 (submitit's warning ``--signal=USR2@90`` before the time limit or a preemption) and
  SIGUSR1 (the same warning on clusters configured with it): noted, and delivered to the process as
  SIGTERM, so the trial is handed back the same way (by whatever handles SIGTERM then), then submitit's own checkpoint/requeue handler runs (``SlurmWorker.checkpoint``): the job is
  requeued and, when it starts again, claims the first runnable trial, which may be that one.

A job trains on as many threads as it was given CPUs (``--cpus-per-job``), as local workers do.

Torch-free at import; submitit is imported only to submit (not needed by ``harness status``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from harness.db import Database, SlurmJobRow, StudyRow, resolve_url, utcnow
from harness.spec import Study
from harness.study import artifacts, store
from harness.study.kinds import kind_of
from harness.study.worker import RunOptions, TrialBudget, WorkerContext, run_worker

# Signals that announce the end of a job's time (a time limit or a preemption), after which the
# job asks Slurm to requeue it; SIGTERM/SIGINT interrupt without requeueing.
REQUEUE_SIGNALS: tuple[int, ...] = (signal.SIGUSR1, signal.SIGUSR2)
DEFAULT_TIME = "4:00:00"
DEFAULT_FOLDER = Path("results") / "slurm"
# Seconds before the time limit at which Slurm sends the warning signal (submitit's default).
SIGNAL_DELAY_S = 90


class SlurmSetupError(ValueError):
    """``--launcher slurm`` cannot run here; the message says why (nothing was submitted)."""


@dataclass(frozen=True)
class SlurmOptions:
    """The ``--launcher slurm`` arguments of ``harness run``."""

    jobs: int = 1
    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    time: str = DEFAULT_TIME  # Slurm's format: MINUTES, HH:MM:SS, D-HH:MM...
    mem: str | None = None  # Slurm's format: 16G, 4000M
    folder: Path | None = None  # submitit's folder (logs, pickles); default results/slurm/STUDY


def time_minutes(text: str) -> int:
    """Slurm's time formats (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``)
    as whole minutes, rounded up; ValueError naming the expected forms."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ValueError(f"expected a Slurm time (MINUTES, HH:MM:SS or D-HH:MM:SS), found {text!r}")
    days, first, second, third = match.groups()
    numbers = [int(x) for x in (first, second, third) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + sum(n * f for n, f in zip(numbers, (3600, 60, 1), strict=False))
    elif len(numbers) == 1:  # MM
        seconds = numbers[0] * 60
    elif len(numbers) == 2:  # MM:SS
        seconds = numbers[0] * 60 + numbers[1]
    else:  # HH:MM:SS
        seconds = numbers[0] * 3600 + numbers[1] * 60 + numbers[2]
    if seconds <= 0:
        raise ValueError(f"expected a positive Slurm time, found {text!r}")
    return -(-seconds // 60)


def sqlite_refusal(url: str | None) -> str | None:
    """Why the database at ``url`` (None: the default file) cannot be shared by Slurm jobs (None:
    it can). Reads only the URL: nothing is opened or created."""
    resolved = resolve_url(url)
    if not resolved.startswith("sqlite"):
        return None
    return (
        f"--launcher slurm needs a database server that every node reaches (PostgreSQL: --db "
        f"postgresql://USER@HOST/DB); {resolved} is SQLite, whose file locking is unreliable on the "
        "shared filesystems (NFS, Lustre, GPFS) of a cluster, so concurrent jobs could lose or "
        "corrupt results. Nothing was submitted"
    )


def executor_parameters(study: Study, slurm: SlurmOptions) -> dict[str, Any]:
    """What submitit's SlurmExecutor is given (it writes the sbatch script from them)."""
    parameters: dict[str, Any] = {
        "job_name": f"harness-{study.name}"[:100],
        "time": time_minutes(slurm.time),
        "nodes": 1,
        "ntasks_per_node": 1,
        "signal_delay_s": SIGNAL_DELAY_S,
        "array_parallelism": slurm.jobs,
    }
    if slurm.partition:
        parameters["partition"] = slurm.partition
    if slurm.gpus_per_job:
        parameters["gpus_per_node"] = slurm.gpus_per_job
    if slurm.cpus_per_job:
        parameters["cpus_per_task"] = slurm.cpus_per_job
    if slurm.mem:
        parameters["mem"] = slurm.mem
    return parameters


def job_folder(study: Study, slurm: SlurmOptions) -> Path:
    return (slurm.folder or DEFAULT_FOLDER / study.name).resolve()


def sbatch_lines(study: Study, slurm: SlurmOptions) -> list[str]:
    """``--dry-run``: the sbatch script submitit would submit (its ``#SBATCH`` lines and command)."""
    parameters = executor_parameters(study, slurm)
    try:
        from submitit.slurm.slurm import _make_sbatch_string
    except ImportError:  # show the parameters themselves: the dry run must not need the extra
        return [f"slurm job array of {slurm.jobs} job(s) (install the `slurm` extra to see the sbatch script):"] + [
            f"  {key} = {value}" for key, value in parameters.items()
        ]
    parameters = {**parameters, "map_count": slurm.jobs}
    folder = job_folder(study, slurm)
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    script = _make_sbatch_string(command=command, folder=folder, **parameters)
    return [f"slurm job array of {slurm.jobs} job(s), logs in {folder}:"] + [
        "  " + line for line in script.splitlines() if line.strip()
    ]


# ----------------------------------------------------------------------------------------------
# Inside a job


@dataclass(frozen=True)
class SlurmWorker:
    """What each job of the array runs (pickled by submitit): one worker on the shared database.
    ``checkpoint`` is submitit's requeue hook."""

    study: Study
    options: RunOptions
    study_id: int
    row_ids: tuple[int, ...] | None
    started: datetime

    def __call__(self) -> dict[str, Any]:
        received: list[int] = []
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        name = f"{job}_{task}" if job and task else os.environ.get("SLURM_JOB_ID", "?")

        def echo(line: str) -> None:
            print(f"[slurm {name}] {line}", flush=True)

        _use_allotted_cpus()
        db = Database(self.options.db)
        try:
            ctx = WorkerContext(
                db=db,
                study=self.study,
                options=self.options,
                study_id=self.study_id,
                row_ids=self.row_ids,
                started=self.started,
                budget=TrialBudget(None),  # --max-trials is refused with --launcher slurm
                echo=echo,
                run_trial=_trial_runner(),
            )
            with _warnings_as_sigterm(received):
                code = run_worker(ctx, kind_of(self.study))
        finally:
            db.dispose()
        tally = {k: getattr(ctx.tally, k) for k in ("ran", "complete", "failed", "pruned", "lost")}
        if ctx.tally.interrupted and received:
            echo(f"{signal.Signals(received[0]).name}: trial handed back; asking Slurm to requeue this job")
            _requeue_through_submitit()
        return {"exit_code": code, **tally}

    def checkpoint(self) -> Any:
        """submitit calls this on its warning signal, then requeues the job with what it returns:
        the same worker (its trial was handed back before; the database says what is left)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


@contextmanager
def _warnings_as_sigterm(received: list[int]) -> Iterator[None]:
    """SIGUSR1/SIGUSR2 (the end of the job's time is near) are noted in ``received`` and delivered
    to this process as SIGTERM, so that whatever handles SIGTERM at that moment (the worker loop's
    interrupt, or a trial's own stop-at-the-next-step handler) hands the trial back the one way it
    always does; after the loop, the note says to requeue."""

    def warned(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            os.kill(os.getpid(), signal.SIGTERM)

    previous = {sig: signal.signal(sig, warned) for sig in REQUEUE_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _use_allotted_cpus() -> None:
    """Train on as many threads as the job was given CPUs (``--cpus-per-job``: Slurm's
    ``SLURM_CPUS_PER_TASK``). torch otherwise takes every core it sees, and on a cluster that does
    not bind tasks to their CPUs (``TaskPlugin=task/none``) jobs sharing a node then oversubscribe
    it: each thread waits on the others (several times slower). Without ``--cpus-per-job``
    (no such variable) torch's own choice stands."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit() and int(cpus) > 0:
        import torch  # the job trains: torch is loaded for its trials anyway

        torch.set_num_threads(int(cpus))


def _trial_runner() -> Callable[..., Any]:
    from harness.study.runner import default_trial_runner

    return default_trial_runner()


def _requeue_through_submitit() -> None:
    """Send this process submitit's own warning signal: its handler (restored now that the worker
    loop has ended) calls ``SlurmWorker.checkpoint``, runs ``scontrol requeue`` and exits."""
    from submitit.core.job_environment import JobEnvironment

    os.kill(os.getpid(), JobEnvironment._usr_sig())


# ----------------------------------------------------------------------------------------------
# Submitting, showing, cancelling


def submit(
    study: Study,
    options: RunOptions,
    slurm: SlurmOptions,
    *,
    echo: Callable[[str], None] = print,
) -> list[str]:
    """Register the study and submit its K worker jobs; returns their Slurm job ids. Raises
    SlurmSetupError (SQLite, no submitit, no sbatch) before writing anything."""
    if options.max_trials is not None:
        raise SlurmSetupError("--max-trials cannot be shared by Slurm jobs; leave it out with --launcher slurm")
    try:
        import submitit
    except ImportError:
        raise SlurmSetupError(
            "--launcher slurm needs submitit: pip install -e '.[slurm]'; nothing was submitted"
        ) from None
    if shutil.which("sbatch") is None:
        raise SlurmSetupError("--launcher slurm: no `sbatch` on this machine's PATH (run it on a Slurm login node)")
    refusal = sqlite_refusal(options.db)
    if refusal:
        raise SlurmSetupError(refusal)
    db = Database(options.db)
    try:
        kind = kind_of(study)
        store.check_kind(db, study)
        kind.prepare(db)
        report = store.sync_study(db, study)
        for line in kind.sync_lines(report):
            echo(line)
        for note in study.notes:
            echo(f"note: {note}")
        folder = job_folder(study, slurm)
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**executor_parameters(study, slurm))
        worker = SlurmWorker(
            study=study,
            options=replace(options, workers=1, progress=False, checkpoint_dir=pinned_checkpoint_dir(study, options)),
            study_id=report.study_id,
            row_ids=report.row_ids,
            started=utcnow(),
        )
        with executor.batch():
            jobs = [executor.submit(worker) for _ in range(slurm.jobs)]
        ids = [str(job.job_id) for job in jobs]
        host = socket.gethostname()

        def record(session: Any) -> None:
            for job_id in ids:
                session.add(SlurmJobRow(study_id=report.study_id, job_id=job_id, folder=str(folder), submitted_by=host))

        db.run(record)
    finally:
        db.dispose()
    echo(f"submitted {len(ids)} Slurm job(s) for study {study.name}: {', '.join(ids)} (logs in {folder})")
    echo(f"follow them with `harness status {study.name}`; stop them with `harness cancel {study.name}`")
    return ids


def pinned_checkpoint_dir(study: Study, options: RunOptions) -> str | None:
    """The checkpoint root the jobs use, made absolute here, on the submitting machine: a job's
    working directory is Slurm's choice (``/tmp`` on a node where the submission folder does not
    exist), and a requeued job that looked for its trial's checkpoint under another directory
    would start the trial again from zero. ``--checkpoint-dir`` made absolute, else the study's
    ``fixed.checkpoint_dir`` made absolute, else the default root (beside a SQLite file, else
    ``results/harness-checkpoints`` under this directory); None where the study varies it per
    point."""
    if options.checkpoint_dir is not None:
        return str(Path(options.checkpoint_dir).expanduser().absolute())
    if any(p.get("checkpoint_dir") for p in study.points):
        return None  # varied per point: each trial's own value (absolute paths work anywhere)
    own = study.fixed.get("checkpoint_dir")
    if own:
        return str(Path(own).expanduser().absolute())
    return str(artifacts.checkpoint_root(options.db))


@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str  # Slurm's (PENDING, RUNNING, COMPLETED, CANCELLED, ...) or a note
    folder: str


def study_jobs(db: Database, study_id: int) -> list[SlurmJobRow]:
    """The jobs submitted for a study (none for a database from before the table existed)."""
    try:
        return db.run(
            lambda s: list(s.scalars(select(SlurmJobRow).where(SlurmJobRow.study_id == study_id).order_by(SlurmJobRow.id)))
        )
    except SQLAlchemyError:
        return []


def slurm_states(job_ids: Sequence[str], *, run: Callable[..., Any] = subprocess.run) -> Mapping[str, str]:
    """Slurm's state of each job (``squeue --states=all`` also lists recently ended ones); a job it
    no longer knows is missing from the result. Empty when squeue is absent or fails."""
    if not job_ids or (run is subprocess.run and shutil.which("squeue") is None):
        return {}
    arrays = sorted({job_id.split("_", 1)[0] for job_id in job_ids})
    try:
        result = run(
            ["squeue", "-h", "--states=all", "-j", ",".join(arrays), "-o", "%i|%T"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    states: dict[str, str] = {}
    for line in result.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if state:
            states[job_id] = state
    return states


def job_states(db: Database, study_id: int) -> list[JobState]:
    rows = study_jobs(db, study_id)
    known = slurm_states([row.job_id for row in rows])
    unknown = "not known to Slurm (ended a while ago)" if shutil.which("squeue") else "unknown (no squeue here)"
    return [JobState(row.job_id, known.get(row.job_id, unknown), row.folder) for row in rows]


def status_lines(db: Database, study_id: int) -> list[str]:
    """``harness status``: the study's Slurm jobs and their states (nothing when it has none)."""
    states = job_states(db, study_id)
    if not states:
        return []
    counts: dict[str, int] = {}
    for job in states:
        counts[job.state] = counts.get(job.state, 0) + 1
    summary = ", ".join(f"{n} {state.lower()}" for state, n in counts.items())
    lines = [f"  slurm jobs ({len(states)}): {summary}"]
    lines += [f"    {job.job_id}: {job.state}" for job in states]
    return lines


ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "CONFIGURING", "COMPLETING", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT"})


def cancel(db: Database, name: str, *, echo: Callable[[str], None] = print) -> int:
    """``harness cancel STUDY``: scancel the study's jobs that Slurm still runs or queues. Each
    running job gets SIGTERM and hands its trial back as pending (Slurm kills it after its
    KillWait; a trial whose job died before handing back is taken over after the heartbeat
    timeout). Returns the number of jobs cancelled."""
    study_id = db.run(lambda s: s.scalar(select(StudyRow.id).where(StudyRow.name == name)))
    if study_id is None:
        raise LookupError(f"no study named {name!r} in the database")
    states = job_states(db, study_id)
    if not states:
        echo(f"study {name}: no Slurm jobs were submitted for it")
        return 0
    if shutil.which("scancel") is None:
        raise SlurmSetupError("no `scancel` on this machine's PATH (run it on the cluster's login node)")
    active = [job.job_id for job in states if job.state in ACTIVE_STATES]
    if not active:
        echo(f"study {name}: none of its {len(states)} Slurm job(s) is queued or running")
        return 0
    result = subprocess.run(["scancel", *active], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise SlurmSetupError(f"scancel {' '.join(active)} failed: {result.stderr.strip() or result.returncode}")
    echo(
        f"study {name}: cancelled {len(active)} Slurm job(s): {', '.join(active)}; running ones hand their "
        "trial back as pending (`harness run` or another submission resumes them)"
    )
    return len(active)


__all__ = [
    "REQUEUE_SIGNALS",
    "JobState",
    "SlurmOptions",
    "SlurmSetupError",
    "SlurmWorker",
    "cancel",
    "executor_parameters",
    "job_states",
    "sbatch_lines",
    "slurm_states",
    "sqlite_refusal",
    "status_lines",
    "submit",
    "time_minutes",
]
