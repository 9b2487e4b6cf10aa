"""Whether the worker that owns a running trial is provably dead, without waiting for its heartbeat.

A worker is named ``host:pid`` (``store.worker_name``). On the same host, a running trial whose
owner's process no longer exists (or is a zombie, or is a newer process that reuses the pid: it
started after the trial's last heartbeat, so it cannot have written it) is abandoned now; a plain
rerun after ``kill -9`` takes it over at once instead of waiting for the heartbeat timeout. Trials
owned on other hosts keep the timeout: their processes cannot be seen from here.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timezone

from harness.db import Database
from harness.study import store
from harness.study.store import Claim

# ``Claim.previous_status`` of a trial taken over from a dead process on this host.
ORPHANED = "orphaned"
# /proc's start times have a resolution of one clock tick; a process that started within this many
# seconds of the last heartbeat is not provably a different one.
START_TIME_SLACK_S = 1.0


def parse_worker(worker: str | None) -> tuple[str, int] | None:
    """(host, pid) of a worker name, None when it is not of the form ``host:pid``."""
    if not worker or ":" not in worker:
        return None
    host, _, pid = worker.rpartition(":")
    if not pid.isdigit() or not host:
        return None
    return host, int(pid)


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as handle:
            for line in handle:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    return text[text.rfind(")") + 2 :].split()


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started, in seconds since the epoch (Linux; None elsewhere)."""
    fields = _proc_stat(pid)
    boot = _boot_time()
    if fields is None or boot is None or len(fields) < 20:
        return None
    # Field 22 of stat (starttime, in clock ticks since boot) is the 20th after the name.
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return True  # cannot tell: not provably dead
    fields = _proc_stat(pid)
    return not (fields is not None and fields[0] in ("Z", "X"))  # a zombie has finished


def owner_is_dead(worker: str | None, heartbeat: datetime | None, *, host: str | None = None) -> bool:
    """True only when ``worker`` provably no longer runs: it ran on this host and its process is
    gone, finished, or replaced by a process started after ``heartbeat`` (naive UTC)."""
    parsed = parse_worker(worker)
    if parsed is None or parsed[0] != (host or socket.gethostname()):
        return False
    pid = parsed[1]
    if pid == os.getpid():
        return False
    if not _exists(pid):
        return True
    started = process_start_time(pid)
    if started is None or heartbeat is None:
        return False
    beat = heartbeat.replace(tzinfo=timezone.utc) if heartbeat.tzinfo is None else heartbeat
    return started > beat.timestamp() + START_TIME_SLACK_S


def claim_orphan(
    db: Database,
    study_id: int,
    worker: str,
    *,
    stale_before: datetime,
    row_ids: Iterable[int] | None = None,
) -> Claim | None:
    """Claim a running trial (with a fresh heartbeat) whose owner on this host is provably dead."""
    host = socket.gethostname()
    for row in store.live_running_rows(db, study_id, stale_before=stale_before, row_ids=row_ids):
        if row.worker == worker or not owner_is_dead(row.worker, row.heartbeat, host=host):
            continue
        claim = store.claim_running(db, row.id, worker, attempts=row.attempts)
        if claim is not None:
            return replace(claim, previous_status=ORPHANED)
    return None


__all__ = ["ORPHANED", "claim_orphan", "owner_is_dead", "parse_worker", "process_start_time"]
