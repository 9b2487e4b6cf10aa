"""``harness report STUDY [--db URL] [--out DIR] [--all]``: the glue harness.cli calls."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from harness.db import DEFAULT_DB_PATH, Database, DatabaseProblem, describe, open_existing
from harness.reports.data import UnknownStudyError, study_names
from harness.reports.render import DEFAULT_OUT_ROOT, HTML_NAME, build_all, build_report
from harness.runtime import output_problem

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


def _error(message: str, code: int = EXIT_USAGE) -> int:
    print(f"harness report: error: {message}", file=sys.stderr)
    return code


def main(args: argparse.Namespace) -> int:
    if args.all and args.study:
        return _error("give a study name or --all, not both")
    if not args.all and not args.study:
        return _error("give a study name or --all")
    urls = args.db or [None]
    if len(urls) > 1 and not args.all:
        return _error("several --db need --all (one study is read from one database)")
    out = args.out if args.out is not None else (DEFAULT_OUT_ROOT if args.all else DEFAULT_OUT_ROOT / args.study)
    # Checked before the database is read: a report that cannot be written writes nothing.
    problem = output_problem(out, folder=True)
    if problem is not None:
        where = "--out" if args.out is not None else "the study name is the folder name (give --out DIR):"
        return _error(f"{where} {problem[0]}", problem[1])
    # A report only reads: no database, and no table in a database that lacks them, is created.
    databases: list[Database] = []
    started = time.perf_counter()
    try:
        for url in urls:
            databases.append(open_existing(url))
        known = [name for database in databases for name in study_names(database)]
        if args.all:
            index = build_all(databases if len(databases) > 1 else databases[0], out_root=out)
            print(f"wrote {len(known)} report(s) and {index} in {time.perf_counter() - started:.1f} s")
            return 0
        written = build_report(databases[0], args.study, out)
        print(f"wrote {written / HTML_NAME} and {written / 'report.md'} in {time.perf_counter() - started:.1f} s")
        return 0
    except UnknownStudyError as error:
        return _error(str(error))
    except (DatabaseProblem, SQLAlchemyError, FileNotFoundError, ImportError) as error:
        message, code = describe(error) or (str(error), EXIT_USAGE)
        return _error(message, code)
    except OSError as error:
        return _error(f"{error.filename or out}: cannot write the report ({error.strerror or error})", 1)
    finally:
        for database in databases:
            database.dispose()
