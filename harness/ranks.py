"""One trial as several processes (``devices_per_trial`` > 1): the side of the process that runs it.

``harness.train.run_trial`` hands such a trial to :func:`run_on_ranks`, which starts N fresh
processes (``spawn``) joined in one ``torch.distributed`` process group: NCCL with one GPU each
(``cuda:B`` .. ``cuda:B+N-1``, B the index of the configured device, 0 for ``auto``/``cuda``) on
CUDA, gloo on the CPU. Each process runs ``run_trial`` itself, as rank r of N: it trains on its
slice of every global batch (``harness.train``; the methods gather the slices before their loss,
``harness.distributed``), and rank 0 alone evaluates, checkpoints and writes the weights.

This process trains nothing; it stays the trial's one contact with the outside:

- rank 0's curve points, tracker metrics, lines and k-NN evaluations come back to it through a
  queue, and it hands them to the callbacks it was given. The study's database writes, Optuna's
  pruning and the trackers therefore work unchanged, and no rank ever opens the database.
- It watches every rank. The first that fails (an exception, or death by a signal such as the
  out-of-memory killer's) fails the whole trial with that rank's reason; the others are killed. A
  rank never outlives it: each asks the kernel for SIGKILL when its parent dies
  (``PR_SET_PDEATHSIG``), and every exit from here kills and reaps what is still running.
- SIGINT/SIGTERM are forwarded to rank 0, which checkpoints at the next step boundary and stops,
  exactly as a single-process trial does; the other ranks ignore both and are killed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness import distributed, provenance
from harness.checkpoint import CheckpointPolicy, TrialCheckpoints, TrialInterrupted
from harness.db.models import SUMMARY_METRICS, utcnow
from harness.runtime import device_problem, failure_reason, libc
from harness.spec import TrialConfig
from harness.tracking import MetricSink
from harness.trial_api import Interrupted, TrialPruned

# After the first failure, how long the other ranks get to report theirs: the earliest failure is
# the trial's reason (a rank that fails makes its peers fail in their next collective, later).
GRACE_SECONDS = 5.0
# How often the parent looks at its ranks while none has anything to say.
POLL_SECONDS = 0.2
# A signal repeated this long after the first one means it (as harness.checkpoint.StopRequests).
REPEAT_SECONDS = 2.0
_PR_SET_PDEATHSIG = 1


def rank_devices(config: TrialConfig) -> tuple[list[str], str]:
    """The device of each rank and the backend: ``cuda:B+r`` with NCCL, or ``cpu`` with gloo.
    Raises ValueError, naming the knob, when this machine has too few CUDA devices."""
    world = config.devices_per_trial
    problem = device_problem(config.device)
    if problem is not None:
        raise ValueError(problem)
    wants_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    if not wants_cuda:
        return ["cpu"] * world, "gloo"
    base = torch.device(config.device).index or 0
    count = torch.cuda.device_count()
    if base + world > count:
        raise ValueError(
            f"devices_per_trial: {world} CUDA devices needed (cuda:{base} to cuda:{base + world - 1}), "
            f"this machine has {count}"
            + (f" (cuda:0 to cuda:{count - 1})" if count else "")
            + "; lower devices_per_trial or use device: cpu (gloo)"
        )
    return [f"cuda:{base + r}" for r in range(world)], "nccl"


@dataclass
class _Failure:
    rank: int
    reason: str
    when: float


def run_on_ranks(
    config: TrialConfig,
    *,
    on_eval: Callable[[int, float], None] | None,
    progress: bool | None,
    sink: MetricSink | None,
    checkpoint: CheckpointPolicy | None,
    on_curves: Callable[[list[tuple[float, int, str, float]]], None] | None,
    say: Callable[[str], None] | None,
) -> Any:
    """``run_trial`` of a trial with ``devices_per_trial`` > 1; the same contract: a record, never
    an exception, except an interrupt (KeyboardInterrupt, TrialInterrupted after a checkpoint)."""
    from harness.train import TrialRecord

    world = config.devices_per_trial
    started = utcnow()

    def failed(reason: str, device: str = config.device) -> TrialRecord:
        if checkpoint is not None:  # as a single-process trial: a failed trial reruns from zero
            TrialCheckpoints(checkpoint.directory, {}).clear()
        return TrialRecord(
            status="failed",
            reason=reason,
            summary=dict.fromkeys(SUMMARY_METRICS),
            curves=[],
            provenance=_provenance(device, world),
            started_at=started,
            checkpoint_dir=str(checkpoint.directory) if checkpoint is not None else None,
        )

    try:
        devices, backend = rank_devices(config)
    except ValueError as error:
        return failed(str(error))
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    events, replies = context.Queue(), context.Queue()
    threads = max(1, torch.get_num_threads() // world)
    port = distributed.free_port()
    processes = [
        context.Process(
            target=RANK_ENTRY,
            args=(r, world, port, backend, config.replace(device=devices[r]), checkpoint, threads,
                  progress, events, replies, os.getpid()),
            name=f"trial-rank-{r}",
        )
        for r in range(world)
    ]
    watch = _Watch(processes)
    try:
        # Started with SIGINT/SIGTERM ignored (inherited through exec), so that a signal while a
        # rank imports its modules is no traceback; rank 0 takes them up once its handlers are set.
        with _handling_signals(signal.SIG_IGN):
            for process in processes:
                process.start()
        with watch.forwarding_signals():
            outcome = watch.wait(events, replies, on_eval=on_eval, sink=sink, on_curves=on_curves, say=say)
    except Exception as error:  # starting a process, a callback: still a failed trial, not a crash
        outcome = ("failed", failure_reason(error))
    finally:
        watch.stop_all()
        # The queues' semaphores are freed now, not left to the interpreter's exit (where an
        # interrupt's traceback still holds them and the resource tracker warns of a leak).
        for process in processes:
            process._args = ()
        events.close()
        replies.close()
        del events, replies
    kind = outcome[0]
    if kind == "interrupted":
        _, signum, path, message = outcome
        if path is not None:
            raise TrialInterrupted(signum, Path(path))
        raise Interrupted(signum, message) if signum else KeyboardInterrupt(message)
    if kind == "failed":
        return failed(outcome[1], devices[0])
    record = outcome[1]
    record.started_at = started
    record.provenance = _provenance(devices[0], world, record.provenance)
    watch.resend_signal()
    return record


@contextlib.contextmanager
def _handling_signals(handler: Any) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``handler`` (a function or ``signal.SIG_IGN``) inside the block, then
    back to what they were; nothing changes off the main thread (only it may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, restored in previous.items():
            signal.signal(signum, restored)


def _provenance(device: str, world: int, collected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rank 0's provenance, its device named with the number of processes ("2 x NVIDIA H100")."""
    values = dict(collected) if collected else provenance.collect(device if device != "auto" else "cpu")
    values["device_name"] = f"{world} x {values.get('device_name')}"
    return values


class _Watch:
    """The parent's view of the ranks: their messages, their exits, the signals it forwards."""

    def __init__(self, processes: list[Any]) -> None:
        self.processes = processes
        self.world = len(processes)
        self.signum: int | None = None
        self.first_signal_at = 0.0
        self.forwarded = False
        self.interrupted = False

    def forwarding_signals(self) -> contextlib.AbstractContextManager[None]:
        return _handling_signals(self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum, self.first_signal_at = signum, time.monotonic()
            rank0 = self.processes[0]
            if rank0.pid is not None and rank0.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rank0.pid, signum)  # rank 0 checkpoints and stops; the others follow
                self.forwarded = True
        elif time.monotonic() - self.first_signal_at >= REPEAT_SECONDS:
            raise KeyboardInterrupt

    def resend_signal(self) -> None:
        """A signal that came when rank 0 could no longer act on it (its trial had finished) goes
        to this process's own handlers, as if it had come a moment later."""
        if self.signum is not None and not self.interrupted:
            signal.raise_signal(self.signum)

    def wait(
        self,
        events: Any,
        replies: Any,
        *,
        on_eval: Callable[[int, float], None] | None,
        sink: MetricSink | None,
        on_curves: Callable[[list[tuple[float, int, str, float]]], None] | None,
        say: Callable[[str], None] | None,
    ) -> tuple[Any, ...]:
        """Serve rank 0's callbacks until the trial's outcome is known: ("record", record),
        ("failed", reason) or ("interrupted", signum, checkpoint path, message)."""
        failures: list[_Failure] = []
        finished: set[int] = set()
        dead_since: dict[int, float] = {}
        record: Any = None
        record_at: float | None = None
        while True:
            try:
                message = events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                message = None
            if message is not None:
                kind = message[0]
                if kind == "curves" and on_curves is not None:
                    on_curves(message[1])
                elif kind == "metric" and sink is not None:
                    _, name, value, step, epoch = message
                    sink.on_metric(name, value, step=step, epoch=epoch)
                elif kind == "say" and say is not None:
                    say(message[1])
                elif kind == "eval":
                    replies.put(_evaluate(on_eval, message[1], message[2]))
                elif kind == "done":
                    _, r, rank_record, when = message
                    finished.add(r)
                    if rank_record.status == "failed":
                        self._deaths(finished, failures, before=when)
                        failures.append(_Failure(r, rank_record.reason or "failed", when))
                    if r == 0:
                        record, record_at = rank_record, time.monotonic()
                elif kind == "interrupted":
                    _, r, signum, path, text = message
                    finished.add(r)
                    if r == 0:
                        self.interrupted = True
                        return ("interrupted", signum, path, text)
                elif kind == "error":  # outside run_trial: joining the group, a bug here
                    _, r, reason, when = message
                    finished.add(r)
                    self._deaths(finished, failures, before=when)
                    failures.append(_Failure(r, reason, when))
                continue  # read everything queued before judging the processes
            now = time.monotonic()
            for r, process in enumerate(self.processes):
                if r in finished or process.exitcode is None:
                    continue
                # An exit whose message is still on its way is given a moment to arrive.
                dead_since.setdefault(r, now)
                if now - dead_since[r] > 1.0:
                    finished.add(r)
                    failures.append(_Failure(r, _death(process.exitcode), time.time()))
            if failures:
                first = min(failures, key=lambda f: f.when)
                if len(finished) == self.world or time.time() - first.when > GRACE_SECONDS:
                    return self._verdict(failures, record)
            elif record is not None and (
                record.status != "complete" or len(finished) == self.world or now - (record_at or now) > GRACE_SECONDS
            ):
                # Pruned: the other ranks wait in a collective that will not come; they are killed.
                return ("record", record)

    def _deaths(self, finished: set[int], failures: list[_Failure], *, before: float) -> None:
        """Ranks already dead without a word when a peer reports a failure: they died first (the
        peer failed in a collective because they were gone), so their death is the cause."""
        for r, process in enumerate(self.processes):
            if r not in finished and process.exitcode not in (None, 0):
                finished.add(r)
                failures.append(_Failure(r, _death(process.exitcode), before - 1e-6))

    def _verdict(self, failures: list[_Failure], record: Any) -> tuple[Any, ...]:
        """The earliest failure is the cause (its peers then fail in their next collective); one
        that rank 0 shares (a divergence: every rank sees the same global loss) is rank 0's."""
        first = min(failures, key=lambda f: f.when)
        if record is not None and record.status == "failed" and record.reason == first.reason:
            return ("record", record)
        if first.rank == 0 and record is not None and record.status == "failed":
            return ("record", record)
        return ("failed", f"rank {first.rank} of {self.world}: {first.reason}")

    def stop_all(self) -> None:
        """Kill and reap every rank still running (they hold nothing to save: rank 0 has reported,
        or the trial has failed)."""
        for process in self.processes:
            if process.pid is not None and process.exitcode is None:
                process.kill()
        for process in self.processes:
            if process.pid is not None:
                process.join(timeout=30)


def _evaluate(on_eval: Callable[[int, float], None] | None, epoch: int, knn: float) -> tuple[str, str]:
    if on_eval is None:
        return ("ok", "")
    try:
        on_eval(epoch, knn)
    except TrialPruned as pruned:
        return ("pruned", str(pruned))
    except Exception as error:
        return ("error", failure_reason(error))
    return ("ok", "")


def _death(exitcode: int) -> str:
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"the process died (killed by {name})"
    return f"the process exited with status {exitcode} without a result"


# ----------------------------------------------------------------------------------------------
# Inside a rank


class _Forward:
    """Rank 0's callbacks: each sends its call to the parent (``on_eval`` waits for the answer)."""

    def __init__(self, events: Any, replies: Any) -> None:
        self.events, self.replies = events, replies

    def on_metric(self, name: str, value: float, *, step: int, epoch: float) -> None:
        self.events.put(("metric", name, float(value), int(step), float(epoch)))

    def on_curves(self, points: list[tuple[float, int, str, float]]) -> None:
        self.events.put(("curves", [tuple(p) for p in points]))

    def say(self, line: str) -> None:
        self.events.put(("say", line))

    def on_eval(self, epoch: int, knn: float) -> None:
        self.events.put(("eval", int(epoch), float(knn)))
        kind, text = self.replies.get()
        if kind == "pruned":
            raise TrialPruned(text)
        if kind == "error":
            raise RuntimeError(f"on_eval: {text}")


def _rank_main(
    rank: int,
    world: int,
    port: int,
    backend: str,
    config: TrialConfig,
    checkpoint: CheckpointPolicy | None,
    threads: int,
    progress: bool | None,
    events: Any,
    replies: Any,
    parent: int,
) -> None:
    """One rank: join the group, run the trial as rank ``rank``, report to the parent."""
    _die_with(parent)
    if rank > 0:  # driven by rank 0 and killed by the parent; a terminal's Ctrl-C is not for them
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
    torch.set_num_threads(threads)
    # tqdm's default lock is a multiprocessing semaphore, registered with the resource tracker the
    # ranks share with their parent; a rank killed by the parent would leave it to a warning there.
    from tqdm.std import tqdm

    tqdm.set_lock(threading.RLock())
    from harness.train import run_trial

    try:
        if config.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(config.device))
        with distributed.process_group(rank, world, port, backend):
            forward = _Forward(events, replies) if rank == 0 else None
            record = run_trial(
                config,
                on_eval=forward.on_eval if forward else None,
                progress=progress if rank == 0 else False,
                sink=forward,
                checkpoint_dir=checkpoint,
                on_curves=forward.on_curves if forward else None,
                say=forward.say if forward else None,
            )
            if rank > 0:  # only rank 0's record is the trial's
                record.curves, record.data = [], {}
            # Sent before leaving the group: a failing rank's report is stamped before its peers
            # notice it gone.
            events.put(("done", rank, record, time.time()))
    except KeyboardInterrupt as interrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a forwarded copy of the same signal
        checkpoint_path = getattr(interrupt, "checkpoint", None)
        events.put(
            ("interrupted", rank, getattr(interrupt, "signum", 0),
             str(checkpoint_path) if checkpoint_path is not None else None, str(interrupt))
        )
    except BaseException as error:  # reported as this rank's failure
        events.put(("error", rank, failure_reason(error), time.time()))
    events.close()
    events.join_thread()


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _die_with(parent: int) -> None:
    """SIGKILL from the kernel when the parent dies, so that no rank outlives a killed worker."""
    c = libc()
    if c is not None:
        c.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


# The function each rank's process runs (picklable by reference; a test wraps it to fail a rank).
RANK_ENTRY: Callable[..., None] = _rank_main
