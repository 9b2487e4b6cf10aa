"""Running a study: register it, then claim and run its trials until none is left.

Each worker (a process) loops: claim one trial atomically, run it while a heartbeat thread keeps
the claim alive, write the result in one transaction. A trial whose worker died (its heartbeat is
older than the timeout) is claimed again and rerun; a complete trial never is. Ctrl-C hands the
current trial back as pending ("interrupted") and exits. ``--workers N`` starts N such processes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from harness.db import Database, utcnow
from harness.spec import Study
from harness.study import store
from harness.study.store import Claim, SyncReport

DEFAULT_HEARTBEAT_TIMEOUT = 90.0
# A worker with nothing to claim while other workers' trials run waits for them, so that it can
# take over a trial whose worker dies; it polls this often (at most).
MAX_POLL_SECONDS = 2.0


class TrialRunner(Protocol):
    """``harness.train.run_trial``'s signature (injectable, for tests)."""

    def __call__(
        self,
        config: Any,
        *,
        on_eval: Callable[[int, float], None] | None = None,
        progress: bool | None = None,
    ) -> Any: ...


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

    def __init__(self, db: Database, claim: Claim, interval: float) -> None:
        self._db = db
        self._claim = claim
        self._interval = interval
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{claim.row_id}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if not store.heartbeat(self._db, self._claim):
                    self.lost = True
                    return
            except Exception:  # a missed beat is retried next interval; the timeout allows several
                continue

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, self._interval * 2))


@dataclass
class WorkerContext:
    """Everything one worker process needs; built once per process."""

    db: Database
    study: Study
    options: RunOptions
    study_id: int
    row_ids: tuple[int, ...] | None
    started: datetime
    budget: TrialBudget
    echo: Callable[[str], None]
    run_trial: TrialRunner
    worker: str = field(default_factory=store.worker_name)
    tally: RunTally = field(default_factory=RunTally)

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


def default_trial_runner() -> TrialRunner:
    from harness.train import run_trial  # torch is imported only by processes that train

    return run_trial


@dataclass(frozen=True)
class Finished:
    """A trial result as written to the database."""

    status: str
    summary: Mapping[str, Any]


def run_claim(
    ctx: WorkerContext,
    claim: Claim,
    *,
    on_eval: Callable[[int, float], None] | None = None,
) -> Finished | None:
    """Run one claimed trial and write its result; None if the claim was lost meanwhile (another
    worker took the trial over). KeyboardInterrupt hands the trial back and propagates."""
    config = claim.trial_config(ctx.options.device)
    if claim.previous_status == "running":
        ctx.echo(
            f"trial #{claim.row_id} ({ctx.label(claim.config)}): taking over from {claim.previous_worker}, whose heartbeat stopped"
        )
    elif claim.previous_status == "failed":
        ctx.echo(f"trial #{claim.row_id} ({ctx.label(claim.config)}): retrying a failed trial")
    ctx.echo(f"trial #{claim.row_id} ({ctx.label(claim.config)}): running on {_device_shown(config.device)}")
    started = time.perf_counter()
    try:
        with Heartbeat(ctx.db, claim, ctx.options.heartbeat_interval) as beat:
            try:
                record = ctx.run_trial(config, on_eval=on_eval, progress=ctx.options.progress)
                outcome = {
                    "status": record.status,
                    "reason": record.reason,
                    "summary": record.summary,
                    "curves": record.curves,
                    "provenance": record.provenance,
                    "started_at": record.started_at,
                    "ended_at": record.ended_at,
                }
            except KeyboardInterrupt:
                raise
            except Exception as error:  # the trial API should not raise; if it does, that is a failed result
                where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
                place = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
                outcome = {
                    "status": "failed",
                    "reason": f"{type(error).__name__}: {error}{place}",
                    "summary": {},
                    "curves": [],
                    "provenance": {},
                    "started_at": None,
                    "ended_at": None,
                }
            written = (not beat.lost) and store.finish(ctx.db, claim, config=config.to_dict(), **outcome)
    except KeyboardInterrupt:
        if store.release(ctx.db, claim, "interrupted"):
            ctx.echo(
                f"trial #{claim.row_id}: interrupted; set back to pending (run the study again to resume)"
            )
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
    ctx.echo(
        f"trial #{claim.row_id} ({ctx.label(claim.config)}): {describe_outcome(status, outcome, seconds)}"
    )
    return Finished(status, dict(outcome["summary"] or {}))


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
            f"{name} {summary[name]:.4f}"
            for name in ("knn_top1", "linear_top1", "final_loss")
            if isinstance(summary.get(name), (int, float))
        ]
        return f"complete in {seconds:.1f} s" + (f": {', '.join(shown)}" if shown else "")
    return f"{status} after {seconds:.1f} s: {outcome.get('reason') or 'no reason given'}"


def grid_loop(ctx: WorkerContext) -> None:
    """Claim and run the study's trials until none is runnable and none runs elsewhere."""
    waiting_said = False
    while ctx.budget.take():
        claim = store.claim_next(
            ctx.db,
            ctx.study_id,
            ctx.worker,
            stale_before=ctx.stale_before,
            row_ids=ctx.row_ids,
            retry_failed_before=ctx.retry_failed_before,
        )
        if claim is None:
            ctx.budget.give_back()
            others = store.live_running(
                ctx.db, ctx.study_id, stale_before=ctx.stale_before, row_ids=ctx.row_ids
            )
            if others == 0:
                return
            if not waiting_said:
                ctx.echo(
                    f"waiting for {others} trial(s) running in other workers (to take over any whose worker dies)"
                )
                waiting_said = True
            time.sleep(ctx.poll_seconds)
            continue
        waiting_said = False
        run_claim(ctx, claim)


# ----------------------------------------------------------------------------------------------
# Whole runs


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    tally: RunTally


def describe_sync(study: Study, report: SyncReport, limit: int = 10) -> list[str]:
    """What registering the file changed, for the terminal."""
    lines: list[str] = []
    if study.search is not None:
        state = "new" if report.created else ("file changed" if report.file_changed else "unchanged")
        lines.append(f"study {study.name} (search, {state}): {report.kept} trial(s) in the database so far")
        return lines
    total = len(report.row_ids or ())
    if report.created:
        lines.append(f"study {study.name} ({study.kind}): new, {total} trial(s)")
    elif report.file_changed or report.added or report.gone:
        lines.append(
            f"study {study.name} ({study.kind}): the file changed since the last run: "
            f"{len(report.added)} trial(s) added, {report.kept} kept ({report.kept_finished} with results)"
        )
    else:
        lines.append(
            f"study {study.name} ({study.kind}): {total} trial(s), {report.kept_finished} with results"
        )
    if report.added and not report.created:
        lines.extend(f"  + {label}" for label in report.added[:limit])
        if len(report.added) > limit:
            lines.append(f"  + ... and {len(report.added) - limit} more")
    if report.gone:
        lines.append(f"  {len(report.gone)} trial(s) no longer in the file (kept in the database, not run):")
        lines.extend(f"  - {label}" for label in report.gone[:limit])
        if len(report.gone) > limit:
            lines.append(f"  - ... and {len(report.gone) - limit} more")
    return lines


def run_study(
    study: Study,
    options: RunOptions,
    *,
    run_trial: TrialRunner | None = None,
    echo: Callable[[str], None] | None = None,
) -> RunResult:
    """``harness run``: register the study (printing what changed), then run it with
    ``options.workers`` worker processes. Raises StudyConflict / SearchSetupError before running
    anything when the file cannot be run against this database."""
    say = echo or _print
    db = Database(options.db)
    store.check_kind(db, study)
    if study.search is not None:
        from harness.study import search

        search.prepare(db, study)  # Optuna's tables and study, enqueued points
    report = store.sync_study(db, study)
    for line in describe_sync(study, report):
        say(line)
    for note in study.notes:
        say(f"note: {note}")
    started = utcnow()
    if options.workers <= 1:
        budget = TrialBudget(options.max_trials)
        ctx = WorkerContext(
            db=db,
            study=study,
            options=options,
            study_id=report.study_id,
            row_ids=report.row_ids,
            started=started,
            budget=budget,
            echo=say,
            run_trial=run_trial or default_trial_runner(),
        )
        code = _run_worker(ctx)
        tally = ctx.tally
    else:
        code, tally = _run_workers(study, options, report, started)
    counts = store.status_counts(db, report.study_id, report.row_ids)
    say(_counts_line(study, counts, tally))
    db.dispose()
    return RunResult(code, tally)


def _counts_line(study: Study, counts: Mapping[str, int], tally: RunTally) -> str:
    order = ("complete", "failed", "pruned", "running", "pending")
    parts = [f"{counts[s]} {s}" for s in order if counts.get(s)]
    this = f"this run: {tally.ran} trial(s)" + (f", {tally.reused} reused" if tally.reused else "")
    where = "" if tally.interrupted else f"; see `harness status {study.name}`"
    return f"study {study.name}: {', '.join(parts) or 'no trials'} ({this}){where}"


def _print(line: str) -> None:
    print(line, flush=True)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the job) hands the trial back like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_worker(ctx: WorkerContext) -> int:
    """One worker's loop; 0 when the study has nothing left for it, 130 after Ctrl-C."""
    with _sigterm_as_interrupt():
        try:
            if ctx.study.search is not None:
                from harness.study import search

                search.search_loop(ctx)
            else:
                grid_loop(ctx)
        except KeyboardInterrupt:
            ctx.tally.interrupted = True
            ctx.echo("interrupted: stopping (trials left pending run on the next `harness run`)")
            return 130
    return 0


# ----------------------------------------------------------------------------------------------
# Several workers on one machine


def worker_devices(device: str | None, workers: int) -> list[str | None]:
    """One device per worker: with several CUDA devices and no explicit one, round-robin cuda:i."""
    if device not in (None, "auto", "cuda"):
        return [device] * workers
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # no usable torch/CUDA: every worker takes the configured device
        count = 0
    if count > 1:
        return [f"cuda:{i % count}" for i in range(workers)]
    return [device] * workers


@dataclass(frozen=True)
class _WorkerSpec:
    study: Study
    options: RunOptions
    study_id: int
    row_ids: tuple[int, ...] | None
    started: datetime
    index: int
    cpu_threads: int | None


def _worker_entry(spec: _WorkerSpec, shared_budget: Any, tallies: Any) -> None:
    """Entry point of a spawned worker process."""
    if spec.cpu_threads:
        import torch

        # N workers sharing the CPU each get a share of its cores instead of all of them.
        torch.set_num_threads(spec.cpu_threads)
    prefix = f"[w{spec.index}] "

    def echo(line: str) -> None:
        print(prefix + line, flush=True)

    db = Database(spec.options.db)
    ctx = WorkerContext(
        db=db,
        study=spec.study,
        options=spec.options,
        study_id=spec.study_id,
        row_ids=spec.row_ids,
        started=spec.started,
        budget=TrialBudget(spec.options.max_trials, shared_budget),
        echo=echo,
        run_trial=default_trial_runner(),
    )
    code = _run_worker(ctx)
    tallies.put((spec.index, ctx.tally))
    db.dispose()
    sys.exit(code)


def _run_workers(
    study: Study, options: RunOptions, report: SyncReport, started: datetime
) -> tuple[int, RunTally]:
    spawn = multiprocessing.get_context("spawn")
    shared_budget = spawn.Value("i", 0)
    tallies = spawn.Queue()
    devices = worker_devices(options.device, options.workers)
    threads = None if _uses_cuda(devices) else max(1, _cpu_cores() // options.workers)
    processes = []
    for index, device in enumerate(devices):
        worker_options = RunOptions(
            db=options.db,
            device=device,
            workers=1,
            max_trials=options.max_trials,
            retry_failed=options.retry_failed,
            heartbeat_timeout=options.heartbeat_timeout,
            progress=False,  # interleaved progress bars are unreadable
        )
        spec = _WorkerSpec(study, worker_options, report.study_id, report.row_ids, started, index, threads)
        process = spawn.Process(
            target=_worker_entry, args=(spec, shared_budget, tallies), name=f"harness-worker-{index}"
        )
        process.start()
        processes.append(process)
    _print(
        f"started {len(processes)} workers: "
        + ", ".join(f"w{i} on {d or 'the configured device'}" for i, d in enumerate(devices))
    )
    interrupted = False

    def forward_sigterm(signum: int, frame: object) -> None:
        # Ctrl-C reaches every process of the terminal's group; SIGTERM (a scheduler) only us.
        nonlocal interrupted
        interrupted = True
        for process in processes:
            if process.is_alive():
                process.terminate()

    previous = signal.signal(signal.SIGTERM, forward_sigterm)
    try:
        for process in processes:
            while True:
                try:
                    process.join()
                    break
                except KeyboardInterrupt:
                    # The workers got the same Ctrl-C and hand their trials back; wait for them.
                    interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    tally = RunTally()
    while True:
        try:
            _, worker_tally = tallies.get(timeout=0.5)
        except Exception:  # queue empty: every worker that finished normally has reported
            break
        tally.merge(worker_tally)
    codes = [p.exitcode or 0 for p in processes]
    if interrupted or 130 in codes:
        tally.interrupted = True
        return 130, tally
    return max(codes), tally


def _uses_cuda(devices: list[str | None]) -> bool:
    if any(d is not None and d.startswith("cuda") for d in devices):
        return True
    if all(d == "cpu" for d in devices):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # no usable torch: the workers will say so themselves
        return False


def _cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
