"""Why a database cannot be used, as one line and an exit status (no torch, no SQLAlchemy import).

Every command that opens the results database turns what went wrong into the same line and the
same exit status through :func:`describe`, so ``status``, ``export``, ``report``, ``run`` and
``bench`` agree: 2 when the argument names something that is not a harness database (a missing
file, another program's tables, an in-memory URL where something must persist), 1 when the
environment is at fault (a server that does not answer, a corrupt file, a folder SQLite cannot
write in, a database written by a newer harness, one that needs ``harness db upgrade``).
"""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_ENVIRONMENT = 1


class DatabaseProblem(Exception):
    """The database cannot be used as asked; the message says why and what to do."""

    exit_code = EXIT_ENVIRONMENT


class NotHarnessDatabase(DatabaseProblem):
    """The file or server holds no harness tables, or ``harness_*`` tables of another shape
    (another program's): refused before anything is written to it."""

    exit_code = EXIT_USAGE


class NoHarnessTables(NotHarnessDatabase):
    """A database (or an empty file) without any harness table: nothing to read or upgrade yet."""


class NewerSchema(DatabaseProblem):
    """Written by a newer harness: this one does not know its schema and leaves it alone."""


class UpgradeNeeded(DatabaseProblem):
    """Written by an older harness; a read-only command does not upgrade it (``harness db upgrade``
    or any ``harness run`` does)."""


class UnusableDatabase(DatabaseProblem):
    """Not a database, corrupt, unreachable, or in a place SQLite cannot write beside."""


class NotPersistent(DatabaseProblem):
    """An in-memory database where results must be kept."""

    exit_code = EXIT_USAGE


def describe(error: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit status for an error raised while opening or reading the
    database, or None when it is not a database problem (let it propagate)."""
    if isinstance(error, DatabaseProblem):
        return str(error), error.exit_code
    if isinstance(error, FileNotFoundError):
        return str(error), EXIT_USAGE
    if isinstance(error, ImportError):
        return (
            f"the database driver is not installed ({error}); for PostgreSQL: pip install -e '.[postgres]' "
            "(psycopg 3); for another database, the driver SQLAlchemy names for its URL",
            EXIT_ENVIRONMENT,
        )
    from sqlalchemy.exc import SQLAlchemyError

    if isinstance(error, SQLAlchemyError):
        detail = getattr(error, "orig", None) or (error.args[0] if error.args else error)
        return f"cannot use the database: {type(error).__name__}: {detail}", EXIT_ENVIRONMENT
    return None
