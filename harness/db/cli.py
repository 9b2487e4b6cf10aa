"""``harness db version|upgrade [--db URL]``: the schema version of a results database, and the
explicit, in-place upgrade of one written by an older harness (docs/DATABASE.md)."""

from __future__ import annotations

import argparse
import sys

from harness.db.engine import DEFAULT_DB_PATH, Database, open_existing
from harness.db.errors import describe
from harness.db.schema import CREATED, SCHEMA_VERSION, SchemaState


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_text in (
        ("version", "the database's schema version, its history, and the upgrades it is waiting for"),
        ("upgrade", "upgrade an older database in place to this harness's schema (nothing is lost)"),
    ):
        action = actions.add_parser(name, help=help_text, description=help_text)
        action.add_argument(
            "--db",
            metavar="URL",
            default=None,
            help=f"a SQLAlchemy URL (postgresql://...) or a SQLite file path (default: {DEFAULT_DB_PATH})",
        )
        if name == "upgrade":
            action.add_argument(
                "--dry-run", action="store_true", help="list the migrations it would apply; write nothing"
            )


def _fail(action: str, error: BaseException) -> int:
    described = describe(error)
    if described is None:
        raise error
    message, code = described
    print(f"harness db {action}: {message}", file=sys.stderr)
    return code


def _history(state: SchemaState) -> list[str]:
    lines = [f"{state.where}: schema version {state.version} (this harness: {SCHEMA_VERSION})"]
    if not state.history or state.history[0][1] != CREATED:
        lines.append("  version 1: written by the wave-1 harness, which recorded no version")
    for version, summary, applied_at in state.history:
        when = applied_at.strftime("%Y-%m-%d %H:%M:%S UTC") if applied_at else "?"
        lines.append(f"  version {version}: {summary} ({when})")
    for migration in state.pending:
        lines.append(f"  pending: version {migration.version}: {migration.summary}")
    return lines


def main(args: argparse.Namespace) -> int:
    try:
        database = open_existing(args.db, allow_older=True)  # reads only
    except Exception as error:
        return _fail(args.action, error)
    state = database.state
    database.dispose()
    if args.action == "version" or state.current:
        print("\n".join(_history(state)))
        if args.action == "upgrade":
            print("nothing to upgrade")
        return 0
    if args.dry_run:
        print("\n".join(_history(state)))
        print(f"would apply {len(state.pending)} migration(s); nothing was written")
        return 0
    try:
        upgraded = Database(args.db, say=print)
    except Exception as error:
        return _fail(args.action, error)
    upgraded.dispose()
    return 0
