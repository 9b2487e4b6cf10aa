"""``harness report STUDY [--db URL] [--out DIR] [--all]``: the glue harness.cli calls."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from harness.db import DEFAULT_DB_PATH, Database, open_existing
from harness.reports.data import UnknownStudyError, study_names
from harness.reports.render import DEFAULT_OUT_ROOT, HTML_NAME, build_all, build_report

EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "study", nargs="?", help="the study's name (its `study:` key), as stored in the database"
    )
    parser.add_argument(
        "--db",
        action="append",
        default=None,
        help=f"SQLAlchemy URL or SQLite path (default {DEFAULT_DB_PATH}); with --all, repeat it to index "
        "the studies of several databases on one page",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default {DEFAULT_OUT_ROOT}/STUDY; with --all, the root, default {DEFAULT_OUT_ROOT})",
    )
    parser.add_argument(
        "--all", action="store_true", help="render every study and an index page linking them"
    )


def _error(message: str) -> int:
    print(f"harness report: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(args: argparse.Namespace) -> int:
    if args.all and args.study:
        return _error("give a study name or --all, not both")
    if not args.all and not args.study:
        return _error("give a study name or --all")
    urls = args.db or [None]
    if len(urls) > 1 and not args.all:
        return _error("several --db need --all (one study is read from one database)")
    # A report only reads: no database, and no table in a database that lacks them, is created.
    databases = []
    try:
        for url in urls:
            databases.append(open_existing(url))
    except FileNotFoundError as error:
        for opened in databases:
            opened.dispose()
        return _error(str(error))
    if len(databases) > 1:
        return _report_all(databases, args)
    database = databases[0]
    started = time.perf_counter()
    try:
        try:
            known = study_names(database)
        except SQLAlchemyError as error:
            return _error(
                f"cannot read the harness tables of {database.url} ({type(error).__name__}: {error.args[0] if error.args else error})"
            )
        if args.all:
            index = build_all(database, out_root=args.out if args.out is not None else DEFAULT_OUT_ROOT)
            print(f"wrote {len(known)} report(s) and {index} in {time.perf_counter() - started:.1f} s")
            return 0
        try:
            out = build_report(database, args.study, args.out)
        except UnknownStudyError as error:
            return _error(str(error))
        print(f"wrote {out / HTML_NAME} and {out / 'report.md'} in {time.perf_counter() - started:.1f} s")
        return 0
    finally:
        database.dispose()


def _report_all(databases: list[Database], args: argparse.Namespace) -> int:
    """``--all`` over several databases: every study of each, one index page."""
    started = time.perf_counter()
    try:
        count = 0
        for database in databases:
            try:
                count += len(study_names(database))
            except SQLAlchemyError as error:
                return _error(f"cannot read the harness tables of {database.url} ({type(error).__name__})")
        index = build_all(databases, out_root=args.out if args.out is not None else DEFAULT_OUT_ROOT)
        print(f"wrote {count} report(s) and {index} in {time.perf_counter() - started:.1f} s")
        return 0
    finally:
        for database in databases:
            database.dispose()
