"""Bench results in the database (``harness_bench``) and in JSON baseline files."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select

from harness.db import BenchRow, Database

ROW_FIELDS: tuple[str, ...] = (
    "kernel",
    "impl",
    "case",
    "params",
    "device",
    "dtype",
    "direction",
    "median_s",
    "iqr_s",
    "min_s",
    "rounds",
    "peak_mem_bytes",
    "ratio_to_reference",
)
JSON_FORMAT = "harness-bench-baseline/1"


def new_run_id() -> str:
    return uuid.uuid4().hex


def store(
    db: Database,
    results: Iterable[dict[str, Any]],
    *,
    run_id: str,
    provenance: dict[str, Any],
    saved_as: str | None = None,
) -> int:
    """Insert one ``harness_bench`` row per result; returns how many."""
    rows = [
        BenchRow(run_id=run_id, saved_as=saved_as, **{k: r[k] for k in ROW_FIELDS}, **provenance)
        for r in results
    ]

    def insert(session: Any) -> int:
        session.add_all(rows)
        return len(rows)

    return db.run(insert)


def load_saved(db: Database, name: str) -> list[dict[str, Any]]:
    """The rows of the latest run saved as ``name`` (an empty list when there is none)."""

    def query(session: Any) -> list[dict[str, Any]]:
        latest = session.execute(
            select(BenchRow.run_id)
            .where(BenchRow.saved_as == name)
            .order_by(BenchRow.created_at.desc(), BenchRow.id.desc())
            .limit(1)
        ).scalar_one_or_none()
        if latest is None:
            return []
        rows = session.execute(
            select(BenchRow).where(BenchRow.run_id == latest).order_by(BenchRow.id)
        ).scalars()
        return [{field: getattr(row, field) for field in ROW_FIELDS} for row in rows]

    return db.run(query)


def is_json_path(name: str) -> bool:
    return name.endswith(".json")


def write_json(
    path: str | Path, results: Iterable[dict[str, Any]], *, name: str, provenance: dict[str, Any]
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "format": JSON_FORMAT,
        "name": name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "provenance": provenance,
        "rows": [{field: r[field] for field in ROW_FIELDS} for r in results],
    }
    path.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    return path


def read_json(path: str | Path) -> list[dict[str, Any]]:
    document = json.loads(Path(path).read_text())
    if not isinstance(document, dict) or "rows" not in document:
        raise ValueError(f"{path}: not a bench baseline (expected an object with 'rows')")
    rows = document["rows"]
    missing = [
        field
        for field in ("kernel", "impl", "case", "direction", "device", "dtype", "ratio_to_reference")
        if rows and field not in rows[0]
    ]
    if missing:
        raise ValueError(f"{path}: baseline rows lack {', '.join(missing)}")
    return rows


def load_baseline(name: str, db: Database | None) -> list[dict[str, Any]]:
    """A baseline by name: a JSON file when ``name`` is a path to one, else the database's rows.

    Raises LookupError when there is no such baseline.
    """
    if is_json_path(name) or Path(name).is_file():
        if not Path(name).is_file():
            raise LookupError(f"baseline file {name} does not exist")
        return read_json(name)
    rows = load_saved(db, name) if db is not None else []
    if not rows:
        raise LookupError(
            f"no baseline saved as {name!r} in the database (run `harness bench --save {name}` first)"
        )
    return rows
