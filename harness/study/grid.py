"""Grids and ablations: every trial is known from the file and inserted as a pending row when the
study is registered, so a worker only claims rows; it never makes new ones."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from harness.db import Database
from harness.spec import Study
from harness.study import store
from harness.study.store import Claim, SyncReport
from harness.study.worker import Job, Skipped, WorkerContext


class GridSource:
    """A grid's trials are its pending rows, which the worker loop claims itself."""

    def adopt(self, claim: Claim) -> Job | None:
        return Job(claim)

    def propose(self) -> Job | Skipped | None:
        return None


@dataclass(frozen=True)
class GridKind:
    """``grid:`` and ``ablate:`` studies."""

    study: Study

    def prepare(self, db: Database) -> None:
        return None

    def sync_lines(self, report: SyncReport, limit: int = 10) -> list[str]:
        study = self.study
        lines: list[str] = []
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
            lines.append(
                f"  {len(report.gone)} trial(s) no longer in the file (kept in the database, not run):"
            )
            lines.extend(f"  - {label}" for label in report.gone[:limit])
            if len(report.gone) > limit:
                lines.append(f"  - ... and {len(report.gone) - limit} more")
        return lines

    def dry_run_lines(self, existing: Mapping[tuple[str, int], str] | None) -> list[str]:
        study = self.study
        trials = study.trials()
        configurations = len({t.config_hash for t in trials})
        lines = [
            f"study {study.name} ({study.kind}): {configurations} configuration(s) x {len(study.seeds)} seed(s) "
            f"= {len(trials)} trial(s) (dry run: nothing is written)"
        ]
        lines.extend(f"note: {note}" for note in study.notes)
        knobs = study.swept_knobs
        for index, config in enumerate(trials, 1):
            state = "new" if existing is None else existing.get((config.config_hash, config.seed), "new")
            lines.append(f"  {index:>4}  {store.trial_label(config.to_dict(), knobs)}  [{state}]")
        if existing is not None:
            wanted = {(t.config_hash, t.seed) for t in trials}
            gone = [key for key in existing if key not in wanted]
            if gone:
                lines.append(
                    f"  {len(gone)} trial(s) in the database are no longer in the file (kept, not run)"
                )
        return lines

    def source(self, ctx: WorkerContext) -> GridSource:
        return GridSource()


__all__ = ["GridKind", "GridSource"]
