"""The one worker loop of every study, and the interface that grids and searches implement.

A worker (one process) loops: take a unit of the ``--max-trials`` budget, claim one trial
atomically (``store.claim_next``: pending, abandoned by a dead worker, or failed with
``--retry-failed``), or else ask the study's ``TrialSource`` for a new one (a search samples;
a grid has none), run it while a heartbeat thread keeps the claim alive, and write the result in
one transaction. With nothing to claim while other workers' trials run, it waits for them, so
that it can take over a trial whose worker dies. Ctrl-C or SIGTERM hands the current trial back
as pending ("interrupted") and ends the loop.

What differs between kinds of study is behind two small interfaces: ``StudyKind`` (registering
the file, describing it) and ``TrialSource`` (turning a claimed row or a new sample into a
``Job``; a ``Job`` learns how its trial ended). Extension points for what runs around a trial
(progress and ETA lines, checkpoints handed back on SIGTERM, resumption) are the ``WorkerEvents``
hooks in ``WorkerContext.events`` and ``interrupt_signals``, the one place that turns signals into
an interrupt.
"""

from __future__ import annotations

import enum
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from harness.db import Database, utcnow
from harness.runtime import failure_reason
from harness.spec import Study
from harness.study import artifacts, liveness, store
from harness.study.store import Claim, SyncReport
from harness.tracking import TrackingSettings, TrialIdentity, open_tracker
from harness.trial_api import Interrupted, TrialRunner
from harness.units import metric_text

DEFAULT_HEARTBEAT_TIMEOUT = 90.0
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What `harness run` exits with after an interrupt: 128 + the signal (130 Ctrl-C, 143 SIGTERM).
INTERRUPT_EXIT_CODES = frozenset(128 + int(sig) for sig in INTERRUPT_SIGNALS)
# A worker with nothing to claim while other workers' trials run waits for them, so that it can
# take over a trial whose worker dies; it polls this often (at most).
MAX_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class RunOptions:
    """How ``harness run`` runs a study (none of it is part of a trial's configuration)."""

    db: str | None = None  # URL or path; None = results/harness.db
    device: str | None = None  # overrides every trial's device
    workers: int = 1
    max_trials: int | None = None  # trials this command runs, all its workers together
    retry_failed: bool = False
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    progress: bool | None = None  # progress bars; None = when stderr is a terminal
    force_workers: bool = False  # more workers than the machine has devices/cores (--force-workers)
    checkpoint_dir: str | None = None  # root of the trials' checkpoint folders (--checkpoint-dir)
    # MLflow/TensorBoard mirrors of each trial (harness.tracking); None = off. The study file's
    # tracking: section merged with --mlflow/--tensorboard (harness run does that).
    tracking: TrackingSettings | None = None

    @property
    def heartbeat_interval(self) -> float:
        # Several heartbeats per timeout, so one slow write (a busy database) does not lose a claim.
        return max(0.1, min(10.0, self.heartbeat_timeout / 6))


@dataclass
class RunTally:
    """What one worker did (mutable, local to the worker)."""

    ran: int = 0
    complete: int = 0
    failed: int = 0
    pruned: int = 0
    reused: int = 0
    lost: int = 0
    interrupted: bool = False

    def add(self, status: str) -> None:
        self.ran += 1
        if status == "complete":
            self.complete += 1
        elif status == "pruned":
            self.pruned += 1
        else:
            self.failed += 1

    def merge(self, other: RunTally) -> None:
        for name in ("ran", "complete", "failed", "pruned", "reused", "lost"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.interrupted |= other.interrupted


class TrialBudget:
    """``--max-trials``: trials this command may still start, shared by its worker processes."""

    def __init__(self, limit: int | None, shared: Any | None = None) -> None:
        self.limit = limit
        self._shared = shared
        self._local = 0

    def take(self) -> bool:
        if self.limit is None:
            return True
        if self._shared is None:
            if self._local >= self.limit:
                return False
            self._local += 1
            return True
        with self._shared.get_lock():
            if self._shared.value >= self.limit:
                return False
            self._shared.value += 1
            return True

    def give_back(self) -> None:
        if self.limit is None:
            return
        if self._shared is None:
            self._local -= 1
            return
        with self._shared.get_lock():
            self._shared.value -= 1

    @property
    def exhausted(self) -> bool:
        if self.limit is None:
            return False
        used = self._local if self._shared is None else self._shared.value
        return used >= self.limit


class Heartbeat:
    """A daemon thread that refreshes a claim's heartbeat until stopped; ``lost`` turns true when
    the claim was taken over (this worker looked dead), after which the result will not be written."""

    def __init__(
        self, db: Database, claim: Claim, interval: float, curves: artifacts.LiveCurves | None = None
    ) -> None:
        self._db = db
        self._claim = claim
        self._interval = interval
        self._curves = curves
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{claim.row_id}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            # The trial's new curve points ride along (live progress), in the beat's transaction.
            points, replace = self._curves.take() if self._curves is not None else ([], False)
            try:
                if not store.heartbeat(self._db, self._claim, points=points, replace_points=replace):
                    self.lost = True
                    return
            except Exception:  # a missed beat is retried next interval; the timeout allows several
                if self._curves is not None:
                    self._curves.give_back(points, replace)
                continue

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, self._interval * 2))


@dataclass(frozen=True)
class Finished:
    """A trial result as written to the database."""

    status: str
    summary: Mapping[str, Any]


class WorkerEvents:
    """Hooks around each trial of the worker loop; every method is a no-op here. Subclass and put
    an instance in ``WorkerContext.events`` to add behaviour (a study-level progress line, keeping
    a checkpoint when a trial is handed back). A hook must not raise."""

    def claimed(self, ctx: WorkerContext, claim: Claim) -> None:
        """The worker owns ``claim`` and is about to run it."""

    def finished(self, ctx: WorkerContext, claim: Claim, result: Finished | None) -> None:
        """The trial's result was written (None: another worker had taken the trial over)."""

    def released(self, ctx: WorkerContext, claim: Claim) -> None:
        """The trial was handed back as pending (Ctrl-C, SIGTERM)."""

    def waiting(self, ctx: WorkerContext, running_elsewhere: int) -> None:
        """Nothing to claim; ``running_elsewhere`` trials run in other workers."""


@dataclass
class WorkerContext:
    """Everything one worker process needs; built once per process."""

    db: Database
    study: Study
    options: RunOptions
    study_id: int
    row_ids: tuple[int, ...] | None  # the rows the file asks for; None: every row of the study
    started: datetime
    budget: TrialBudget
    echo: Callable[[str], None]
    run_trial: TrialRunner
    worker: str = field(default_factory=store.worker_name)
    tally: RunTally = field(default_factory=RunTally)
    events: Sequence[WorkerEvents] = ()

    @property
    def stale_before(self) -> datetime:
        return utcnow() - timedelta(seconds=self.options.heartbeat_timeout)

    @property
    def retry_failed_before(self) -> datetime | None:
        # Only failures from before this command started: a trial that fails again now is a result.
        return self.started if self.options.retry_failed else None

    @property
    def poll_seconds(self) -> float:
        return min(MAX_POLL_SECONDS, max(0.2, self.options.heartbeat_timeout / 3))

    def label(self, config: Mapping[str, Any]) -> str:
        return store.trial_label(config, self.study.swept_knobs)


# ----------------------------------------------------------------------------------------------
# The interface a kind of study implements


class Skipped(enum.Enum):
    """``TrialSource.propose`` handled a sample without training anything (it reused a known
    result, or the sample was invalid): no budget is used, and the loop asks again at once."""

    SKIPPED = "skipped"


SKIPPED = Skipped.SKIPPED


@dataclass(frozen=True)
class Job:
    """A claimed trial about to run, with what its source wants to know about it."""

    claim: Claim
    # Called with (epoch, value) at each intermediate evaluation; may raise TrialPruned.
    on_eval: Callable[[int, float], None] | None = None
    # Called after the result is written (None: another worker took the trial over).
    on_finished: Callable[[Finished | None], None] | None = None
    # Called when the trial is handed back by an interrupt, before the interrupt propagates.
    on_interrupted: Callable[[], None] | None = None


class TrialSource(Protocol):
    """Where one worker's trials come from, besides the claimable rows the loop finds itself."""

    def adopt(self, claim: Claim) -> Job | None:
        """A row the loop claimed (pending, abandoned, or a failure to retry) as a job; None when
        it cannot run after all (its claim is then left to the heartbeat timeout)."""
        ...

    def propose(self) -> Job | Skipped | None:
        """A new trial, claimed; SKIPPED when a sample needed no training; None when the source
        has nothing new now (a grid never has; a search has used its ``n_trials``)."""
        ...


class StudyKind(Protocol):
    """What differs between a grid (or ablation) and a search, outside the worker loop."""

    study: Study

    def prepare(self, db: Database) -> None:
        """Before the study's rows are registered (a search: Optuna's tables, enqueued points)."""
        ...

    def sync_lines(self, report: SyncReport, limit: int = 10) -> list[str]:
        """What registering the file changed, for the terminal."""
        ...

    def dry_run_lines(self, existing: Mapping[tuple[str, int], str] | None) -> list[str]:
        """``harness run --dry-run``: what would run (``existing``: (hash, seed) -> status)."""
        ...

    def source(self, ctx: WorkerContext) -> TrialSource:
        """One worker's trial source (opened in the worker's own process)."""
        ...


# ----------------------------------------------------------------------------------------------
# Running one trial


def run_claim(
    ctx: WorkerContext,
    claim: Claim,
    *,
    on_eval: Callable[[int, float], None] | None = None,
) -> Finished | None:
    """Run one claimed trial and write its result; None if the claim was lost meanwhile (another
    worker took the trial over). KeyboardInterrupt hands the trial back and propagates."""
    config = artifacts.with_current_keeping_knobs(claim.trial_config(ctx.options.device), ctx.study)
    folder = artifacts.trial_folder(
        artifacts.checkpoint_root(ctx.options.db, ctx.options.checkpoint_dir or config.checkpoint_dir),
        ctx.study.name,
        claim.row_id,
    )
    if claim.previous_status == "running":
        ctx.echo(
            f"trial #{claim.row_id} ({ctx.label(claim.config)}): taking over from {claim.previous_worker}, whose heartbeat stopped"
        )
    elif claim.previous_status == liveness.ORPHANED:
        ctx.echo(
            f"trial #{claim.row_id} ({ctx.label(claim.config)}): taking over from {claim.previous_worker}, "
            "whose process on this machine is gone"
        )
    elif claim.previous_status == "failed":
        ctx.echo(f"trial #{claim.row_id} ({ctx.label(claim.config)}): retrying a failed trial")
    where = _device_shown(config.device)
    if config.devices_per_trial > 1:  # one trial on several processes (harness.ranks)
        where = f"{config.devices_per_trial} processes on {where}"
    ctx.echo(f"trial #{claim.row_id} ({ctx.label(claim.config)}): running on {where} (preparing data and model)")
    started = time.perf_counter()
    curves = artifacts.LiveCurves()
    store.set_checkpoint_dir(ctx.db, claim, str(folder))  # `harness status` finds it while it runs
    tracker = open_tracker(
        ctx.options.tracking,
        TrialIdentity(
            study=ctx.study.name,
            trial_id=claim.row_id,
            label=ctx.label(claim.config),
            seed=claim.seed,
            config_hash=config.config_hash,
            config=config.to_dict(),
            description=ctx.study.description,
        ),
    )
    # Only a tracked run hands the trial a sink: an injected test runner need not take one.
    tracked: dict[str, Any] = {"sink": tracker} if tracker is not None else {}
    record: Any = None
    try:
        with Heartbeat(ctx.db, claim, ctx.options.heartbeat_interval, curves) as beat:
            try:
                record = ctx.run_trial(
                    config,
                    on_eval=on_eval,
                    progress=ctx.options.progress,
                    checkpoint_dir=str(folder),
                    on_curves=curves.add,
                    say=lambda line: ctx.echo(f"trial #{claim.row_id}: {line}"),
                    **tracked,
                )
                outcome = {
                    "status": record.status,
                    "reason": record.reason,
                    "summary": record.summary,
                    "curves": record.curves,
                    "provenance": record.provenance,
                    "started_at": record.started_at,
                    "ended_at": record.ended_at,
                    "artifacts": {
                        name: getattr(record, name, None)
                        for name in ("checkpoint_dir", "weights_path", "weights_sha256")
                    },
                    "data": getattr(record, "data", None),  # a runner without it (a test's) stores NULL
                }
            except KeyboardInterrupt:
                raise
            except Exception as error:  # the trial API should not raise; if it does, that is a failed result
                outcome = {
                    "status": "failed",
                    "reason": failure_reason(error),
                    "summary": {},
                    "curves": [],
                    "provenance": {},
                    "started_at": None,
                    "ended_at": None,
                    "data": None,
                }
            written = (not beat.lost) and store.finish(
                ctx.db, claim, config=config.to_dict(), say=ctx.echo, **outcome
            )
            if tracker is not None:
                tracker.finish(
                    str(outcome["status"]),
                    outcome["reason"],
                    outcome["summary"],
                    artifacts=tracked_artifacts(record),
                )
    except KeyboardInterrupt as interrupt:
        # The trial has checkpointed (when it was training): hand it back, and let no second
        # signal (a forwarded copy of the same one) interrupt that.
        _ignore_interrupts()
        if tracker is not None:
            tracker.finish("interrupted", "interrupted; set back to pending")
        if store.release(ctx.db, claim, "interrupted"):
            for events in ctx.events:
                events.released(ctx, claim)
            # A trial stopped while training names the checkpoint it wrote as it stopped (the
            # next attempt resumes from it, whichever worker or job claims it); an interrupt
            # outside the training loop (preparing data, evaluating) carries none.
            written = getattr(interrupt, "checkpoint", None)
            resume = f"resume from checkpoint {written}" if written is not None else "resume"
            ctx.echo(f"trial #{claim.row_id}: interrupted; set back to pending (run the study again to {resume})")
        raise
    seconds = time.perf_counter() - started
    if not written:
        ctx.tally.lost += 1
        ctx.echo(
            f"trial #{claim.row_id}: another worker took this trial over (no heartbeat for "
            f"{ctx.options.heartbeat_timeout:g} s); this run's result is discarded"
        )
        return None
    status = str(outcome["status"])
    ctx.tally.add(status)
    # The configuration was printed once, on the "running" line; the result names the trial only.
    ctx.echo(f"trial #{claim.row_id}: {describe_outcome(status, outcome, seconds)}")
    return Finished(status, dict(outcome["summary"] or {}))


def tracked_artifacts(record: Any) -> list[Any]:
    """The files trackers keep for a trial: the final encoder's weights and their description
    (``encoder.safetensors`` + ``encoder.json``) when the trial saved them, and anything else the
    record lists in ``artifacts``; none for a record without them (a fake trainer's)."""
    from pathlib import Path

    files: list[Any] = list(getattr(record, "artifacts", None) or ())
    weights = getattr(record, "weights_path", None)
    if weights:
        files.append(Path(weights))
        description = Path(weights).with_suffix(".json")
        if description.exists():
            files.append(description)
    return files


def _device_shown(device: str) -> str:
    """``auto`` as the device it resolves to here (``cpu``, ``cuda``), for the progress line. Imports
    torch only when asked, when a trial is about to run anyway."""
    if device != "auto":
        return device
    import torch

    return "cuda (auto)" if torch.cuda.is_available() else "cpu (auto)"


def describe_outcome(status: str, outcome: Mapping[str, Any], seconds: float) -> str:
    summary = outcome.get("summary") or {}
    if status == "complete":
        shown = [
            f"{name} {metric_text(name, summary[name])}"
            for name in ("knn_top1", "linear_top1", "final_loss")
            if isinstance(summary.get(name), (int, float))
        ]
        return f"complete in {seconds:.1f} s" + (f": {', '.join(shown)}" if shown else "")
    return f"{status} after {seconds:.1f} s: {outcome.get('reason') or 'no reason given'}"


def run_job(ctx: WorkerContext, job: Job) -> Finished | None:
    """Run a job's trial, telling its source and the event hooks how it ended."""
    for events in ctx.events:
        events.claimed(ctx, job.claim)
    try:
        finished = run_claim(ctx, job.claim, on_eval=job.on_eval)
    except KeyboardInterrupt:
        if job.on_interrupted is not None:
            job.on_interrupted()
        raise
    if job.on_finished is not None:
        job.on_finished(finished)
    for events in ctx.events:
        events.finished(ctx, job.claim, finished)
    return finished


# ----------------------------------------------------------------------------------------------
# The loop


def claim_runnable(ctx: WorkerContext) -> Claim | None:
    """The next trial that needs running: pending, abandoned (heartbeat stale, or its worker's
    process provably gone), or failed with ``--retry-failed``; claimed for this worker."""
    claim = store.claim_next(
        ctx.db,
        ctx.study_id,
        ctx.worker,
        stale_before=ctx.stale_before,
        row_ids=ctx.row_ids,
        retry_failed_before=ctx.retry_failed_before,
    )
    if claim is not None:
        return claim
    return liveness.claim_orphan(
        ctx.db, ctx.study_id, ctx.worker, stale_before=ctx.stale_before, row_ids=ctx.row_ids
    )


def worker_loop(ctx: WorkerContext, source: TrialSource) -> None:
    """Claim and run trials until none is runnable, the source has nothing new, and no trial runs
    elsewhere (or the budget is used up)."""
    waiting_said = False
    while ctx.budget.take():
        claim = claim_runnable(ctx)
        job: Job | Skipped | None
        if claim is not None:
            job = source.adopt(claim)
            if job is None:  # the claim could not be turned into a run: it used nothing
                ctx.budget.give_back()
                continue
        else:
            job = source.propose()
        if job is SKIPPED:
            ctx.budget.give_back()
            waiting_said = False
            continue
        if isinstance(job, Job):
            waiting_said = False
            run_job(ctx, job)
            continue
        ctx.budget.give_back()
        others = store.live_running(ctx.db, ctx.study_id, stale_before=ctx.stale_before, row_ids=ctx.row_ids)
        if others == 0:
            return
        for events in ctx.events:
            events.waiting(ctx, others)
        if not waiting_said:
            ctx.echo(
                f"waiting for {others} trial(s) running in other workers (to take over any whose worker dies)"
            )
            waiting_said = True
        time.sleep(ctx.poll_seconds)


@contextmanager
def interrupt_signals() -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler stopping the job, Slurm's preemption and time
    limit included) both interrupt the worker: the first one raises KeyboardInterrupt, which hands
    the current trial back; later ones are ignored, so that handing back is not itself interrupted
    (the parent of ``--workers N`` forwards a signal that the terminal may also have sent to the
    workers directly)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        for sig in INTERRUPT_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in INTERRUPT_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_worker(ctx: WorkerContext, kind: StudyKind, *, stop_requested: Callable[[], bool] | None = None) -> int:
    """One worker's whole life: 0 when the study has nothing left for it, 128 + the signal after an
    interrupt (130 after Ctrl-C, 143 after SIGTERM).
    ``stop_requested``: whether an interrupt arrived while this process was starting (a spawned
    worker ignores signals until its handlers are in place; its parent raises this flag too)."""
    with interrupt_signals():
        try:
            if stop_requested is not None and stop_requested():
                raise KeyboardInterrupt
            worker_loop(ctx, kind.source(ctx))
        except KeyboardInterrupt as interrupt:
            ctx.tally.interrupted = True
            ctx.echo("interrupted: stopping (trials left pending run on the next `harness run`)")
            return interrupt_exit_code(interrupt)
    return 0


def interrupt_exit_code(interrupt: BaseException) -> int:
    """128 + the signal that interrupted (a plain KeyboardInterrupt counts as SIGINT)."""
    return 128 + int(getattr(interrupt, "signum", signal.SIGINT))


def _ignore_interrupts() -> None:
    """From now on SIGINT and SIGTERM do nothing (main thread only; ``interrupt_signals``
    restores the handlers when the worker ends)."""
    if threading.current_thread() is threading.main_thread():
        for sig in INTERRUPT_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


__all__ = [
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "INTERRUPT_EXIT_CODES",
    "INTERRUPT_SIGNALS",
    "SKIPPED",
    "Finished",
    "Heartbeat",
    "Job",
    "RunOptions",
    "RunTally",
    "Skipped",
    "StudyKind",
    "TrialBudget",
    "TrialSource",
    "WorkerContext",
    "WorkerEvents",
    "claim_runnable",
    "describe_outcome",
    "interrupt_exit_code",
    "run_claim",
    "run_job",
    "run_worker",
    "worker_loop",
]
