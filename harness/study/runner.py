"""Running a study: register it, then run its trials with one or more workers.

``run_study`` registers the file (``store.sync_study``, after the study's kind prepared what it
needs), then runs ``worker.run_worker`` in this process or in ``--workers N`` spawned processes,
and prints the counts. The loop every worker runs, and the interface that grids and searches
implement, are in ``harness.study.worker``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from harness.db import Database, utcnow
from harness.spec import Study
from harness.study import store
from harness.study.kinds import kind_of
from harness.study.store import SyncReport
from harness.study.worker import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    INTERRUPT_EXIT_CODES,
    INTERRUPT_SIGNALS,
    Finished,
    RunOptions,
    RunTally,
    TrialBudget,
    WorkerContext,
    WorkerEvents,
    run_worker,
)
from harness.trial_api import TrialRunner


def default_trial_runner() -> TrialRunner:
    from harness.train import run_trial  # torch is imported only by processes that train

    return run_trial


# ----------------------------------------------------------------------------------------------
# Whole runs


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    tally: RunTally


def describe_sync(study: Study, report: SyncReport, limit: int = 10) -> list[str]:
    """What registering the file changed, for the terminal (first, any results an earlier run
    kept while the database did not answer, written now)."""
    return [*report.kept_results, *kind_of(study).sync_lines(report, limit)]


def run_study(
    study: Study,
    options: RunOptions,
    *,
    run_trial: TrialRunner | None = None,
    echo: Callable[[str], None] | None = None,
    events: Sequence[WorkerEvents] = (),
) -> RunResult:
    """``harness run``: register the study (printing what changed), then run it with
    ``options.workers`` worker processes. Raises StudyConflict / SearchSetupError before running
    anything when the file cannot be run against this database. ``events`` are given to every
    worker (each worker process gets a copy: they must pickle)."""
    say = echo or _print
    kind = kind_of(study)
    db = Database(options.db)
    store.check_kind(db, study)
    kind.prepare(db)
    report = store.sync_study(db, study)
    for line in describe_sync(study, report):
        say(line)
    for note in study.notes:
        say(f"note: {note}")
    started = utcnow()
    workers, note = capped_workers(options)
    if note:
        say(f"note: {note}")
    options = replace(options, workers=workers)
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
            events=tuple(events),
        )
        code = run_worker(ctx, kind)
        tally = ctx.tally
    else:
        code, tally = _run_workers(study, options, report, started, tuple(events))
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


# ----------------------------------------------------------------------------------------------
# Several workers on one machine


def worker_devices(device: str | None, workers: int) -> list[str | None]:
    """One device per worker: with several CUDA devices and no explicit one, round-robin cuda:i."""
    if device not in (None, "auto", "cuda"):
        return [device] * workers
    count = _cuda_devices()
    if count > 1:
        return [f"cuda:{i % count}" for i in range(workers)]
    return [device] * workers


def capped_workers(options: RunOptions) -> tuple[int, str | None]:
    """``--workers`` capped at what this machine can keep busy: one worker per CUDA device when the
    trials run on CUDA, else one per CPU core; ``--force-workers`` lifts the cap. Returns the
    count and, when capped, a note saying so."""
    wanted = options.workers
    if wanted <= 1 or options.force_workers:
        return wanted, None
    devices = worker_devices(options.device, wanted)
    if _uses_cuda(devices):
        limit, what = _cuda_devices(), "CUDA device(s)"
    else:
        limit, what = _cpu_cores(), "CPU core(s)"
    limit = max(1, limit)
    if wanted <= limit:
        return wanted, None
    return limit, (
        f"--workers {wanted}: this machine has {limit} {what}; running {limit} worker(s) "
        f"(--force-workers runs {wanted})"
    )


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # no usable torch/CUDA
        return 0


@dataclass(frozen=True)
class _WorkerSpec:
    study: Study
    options: RunOptions
    study_id: int
    row_ids: tuple[int, ...] | None
    started: datetime
    index: int
    cpu_threads: int | None
    events: tuple[WorkerEvents, ...]


def _worker_entry(spec: _WorkerSpec, shared_budget: Any, tallies: Any, stop: Any) -> None:
    """Entry point of a spawned worker process. It starts with SIGINT and SIGTERM ignored (see
    ``_run_workers``); ``run_worker`` installs the handlers and then looks at ``stop``."""
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
        events=spec.events,
    )
    code = run_worker(ctx, kind_of(spec.study), stop_requested=stop.is_set)
    tallies.put((spec.index, ctx.tally))
    db.dispose()
    sys.exit(code)


def _run_workers(
    study: Study,
    options: RunOptions,
    report: SyncReport,
    started: datetime,
    events: tuple[WorkerEvents, ...],
) -> tuple[int, RunTally]:
    spawn = multiprocessing.get_context("spawn")
    shared_budget = spawn.Value("i", 0)
    tallies = spawn.Queue()
    stop = spawn.Event()
    devices = worker_devices(options.device, options.workers)
    threads = None if _uses_cuda(devices) else max(1, _cpu_cores() // options.workers)
    processes: list[Any] = []
    interrupted = False
    received = signal.SIGINT

    def forward(signum: int, frame: object) -> None:
        # Ctrl-C reaches every process of the terminal's group; `kill -INT`/`-TERM` of this process
        # (a job scheduler) reaches only us: forward it. A worker acts on its first signal only.
        nonlocal interrupted, received
        interrupted, received = True, signum
        stop.set()
        for process in processes:
            if process.is_alive():
                process.terminate()

    previous = {sig: signal.getsignal(sig) for sig in INTERRUPT_SIGNALS}
    try:
        for index, device in enumerate(devices):
            if interrupted:
                break
            worker_options = RunOptions(
                db=options.db,
                device=device,
                workers=1,
                max_trials=options.max_trials,
                retry_failed=options.retry_failed,
                heartbeat_timeout=options.heartbeat_timeout,
                progress=False,  # interleaved progress bars are unreadable
                checkpoint_dir=options.checkpoint_dir,
                tracking=options.tracking,
            )
            spec = _WorkerSpec(
                study, worker_options, report.study_id, report.row_ids, started, index, threads, events
            )
            process = spawn.Process(
                target=_worker_entry,
                args=(spec, shared_budget, tallies, stop),
                name=f"harness-worker-{index}",
            )
            # The worker inherits ignored signals, so that an interrupt while it imports its modules
            # is no traceback; it learns of one from `stop` once its handlers are in place.
            with _ignoring(INTERRUPT_SIGNALS):
                process.start()
                processes.append(process)
            for sig in INTERRUPT_SIGNALS:
                signal.signal(sig, forward)
        _print(
            f"started {len(processes)} workers: "
            + ", ".join(
                f"w{i} on {d or 'the configured device'}" for i, d in enumerate(devices[: len(processes)])
            )
        )
        for process in processes:
            process.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    tally = RunTally()
    while True:
        try:
            _, worker_tally = tallies.get(timeout=0.5)
        except Exception:  # queue empty: every worker that finished normally has reported
            break
        tally.merge(worker_tally)
    codes = [p.exitcode or 0 for p in processes]
    interrupt_codes = [code for code in codes if code in INTERRUPT_EXIT_CODES]
    if interrupted or interrupt_codes:
        tally.interrupted = True
        return (128 + received if interrupted else max(interrupt_codes)), tally
    return max(codes), tally


@contextmanager
def _ignoring(signals: tuple[int, ...]) -> Iterator[None]:
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


__all__ = [
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "Finished",
    "RunOptions",
    "RunResult",
    "RunTally",
    "capped_workers",
    "default_trial_runner",
    "describe_sync",
    "run_study",
    "worker_devices",
]
