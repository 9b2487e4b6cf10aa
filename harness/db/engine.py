"""The only place that opens database connections and sessions.

SQLite (the default, ``results/harness.db``) is opened in WAL mode with a busy timeout, so several
``harness run`` processes can share one file; any other SQLAlchemy URL works as is. PostgreSQL
(``postgresql://`` with psycopg 3, the ``postgres`` extra) is tested like SQLite (tests/test_postgres.py).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from harness.db import schema
from harness.db.errors import NoHarnessTables, NotPersistent, UnusableDatabase
from harness.db.schema import Migration, SchemaState, apply, read_state, require_current
from harness.runtime import retry

DEFAULT_DB_PATH = Path("results") / "harness.db"
SQLITE_BUSY_TIMEOUT_MS = 30_000
LOCK_RETRIES = 20
# pg_advisory_xact_lock key that serializes table creation across processes (any constant works;
# this one is "harness" in ASCII).
POSTGRES_CREATE_LOCK = 0x68_61_72_6E_65_73_73

T = TypeVar("T")


def resolve_url(url: str | Path | None) -> str:
    """A SQLAlchemy URL from a URL, a plain file path or None (the default database).

    ``postgresql://`` without a driver means psycopg 3 (the ``postgres`` extra), whatever
    SQLAlchemy's own default for the installed version is (psycopg2 before 2.1)."""
    if url is None:
        url = DEFAULT_DB_PATH
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + text.split("://", 1)[1]
    if "://" in text:
        return text
    return f"sqlite:///{Path(text)}"


def sqlite_file(url: str | Path | None) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    text = resolve_url(url)
    if not text.startswith("sqlite") or "///" not in text:
        return None
    path = text.split("///", 1)[1]
    return None if path in ("", ":memory:") else Path(path)


def in_memory(url: str | Path | None) -> bool:
    """Whether the URL is an in-memory SQLite database (``sqlite://``, ``sqlite:///:memory:``),
    which is gone when the process exits."""
    text = resolve_url(url)
    if not text.startswith("sqlite"):
        return False
    return sqlite_file(text) is None or "mode=memory" in text


def require_persistent(url: str | Path | None, what: str) -> None:
    """Refuse an in-memory database where results must be kept (``harness run``)."""
    if in_memory(url):
        raise NotPersistent(
            f"--db {url}: an in-memory SQLite database is gone when {what} exits, with every result in it; "
            "give a file path or a server URL"
        )


def where(url: str) -> str:
    """The database for messages: a SQLite file's path, or the URL without its password."""
    path = sqlite_file(url)
    if path is not None:
        return str(path)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is shown as given; create_engine will say what is wrong
        return url


def open_existing(url: str | Path | None, *, allow_older: bool = False) -> Database:
    """The database for reading, without creating it, its tables or anything in it:
    FileNotFoundError when a SQLite file does not exist (a mistyped path must not come back as an
    empty result and a stray file), a DatabaseProblem when it holds no harness tables, another
    program's, a newer harness's, or (unless ``allow_older``) an older one's."""
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise FileNotFoundError(f"no database at {path} (check the path; `harness run STUDY.yaml` creates one)")
    if in_memory(url):
        raise NotPersistent(f"--db {url}: an in-memory database is empty in every new process; nothing to read")
    return Database(url, create=False, allow_older=allow_older)


def _is_lock_error(error: OperationalError) -> bool:
    message = str(error.orig).lower() if error.orig is not None else str(error).lower()
    return "locked" in message or "busy" in message


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Database:
    """A connection pool and session factory for one database URL.

    ``create=True`` (commands that write): a database without harness tables gets them, at the
    current schema version; an older one is upgraded in place (harness/db/schema.py), which is
    said on stderr. ``create=False`` (commands that only read): nothing is ever written; a
    database without harness tables, or (unless ``allow_older``) an older one, is refused. Either
    way the schema is read first, without writing, and another program's ``harness_*`` tables or
    a newer harness's schema are refused before anything else happens."""

    def __init__(
        self,
        url: str | Path | None = None,
        *,
        create: bool = True,
        allow_older: bool = False,
        say: Callable[[str], None] = _say,
    ) -> None:
        self.url = resolve_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        self.where = where(self.url)
        path = sqlite_file(self.url)
        self.engine: Engine = create_engine(
            self.url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000} if self.is_sqlite else {},
            # A server restarted under a long run: a pooled connection is tested before use.
            **({} if self.is_sqlite else {"pool_pre_ping": True}),
        )
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas if create else _sqlite_reader_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.upgraded: tuple[Migration, ...] = ()
        state = self._read_state(path)
        if not create:
            if state.fresh:
                raise NoHarnessTables(
                    f"{self.where}: holds no harness tables (an empty file, or another program's "
                    "database); `harness run STUDY.yaml --db ...` creates them"
                )
            if not allow_older:
                require_current(state, "" if url is None else f" --db {url}")
            self.state = state
            return
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        if not state.current:
            self.upgraded = self._bring_up_to_date()
            if self.upgraded:
                say(
                    f"{self.where}: upgraded the database from schema version {state.version} to "
                    f"{schema.SCHEMA_VERSION} ({'; '.join(m.summary for m in self.upgraded)})"
                )
        self.state = SchemaState(self.where, schema.SCHEMA_VERSION, {})

    def _read_state(self, path: Path | None) -> SchemaState:
        """The schema, read without writing a byte: a SQLite file through a read-only connection
        (which neither creates the file nor changes its journal mode)."""
        if path is None:
            try:
                with self.engine.connect() as connection:
                    return read_state(connection, self.where)
            except OperationalError as error:
                raise UnusableDatabase(f"{self.where}: cannot connect ({_first_line(error)})") from error
        if not path.exists():
            return SchemaState(self.where, None, {})
        reader = create_engine(
            f"sqlite:///file:{path.resolve()}?mode=ro&uri=true",
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            poolclass=NullPool,
        )
        try:
            with reader.connect() as connection:
                return read_state(connection, self.where)
        except UnusableDatabase as problem:
            cause = problem.__cause__
            if isinstance(cause, OperationalError):  # SQLite's terse words, explained
                raise UnusableDatabase(_sqlite_open_problem(path, cause)) from cause
            raise
        except OperationalError as error:
            raise UnusableDatabase(_sqlite_open_problem(path, error)) from error
        finally:
            reader.dispose()

    def _bring_up_to_date(self) -> tuple[Migration, ...]:
        """Create or upgrade the schema in one transaction that holds the database's write lock,
        re-reading the version under it: several processes opening one database at the same
        moment (a job array starting on one PostgreSQL server) take turns, and the later ones find
        it done. Other databases, without such a lock, retry after "already exists"."""
        engine = self.engine
        if self.is_sqlite and not in_memory(self.url):
            # pysqlite would run DDL outside any transaction; BEGIN IMMEDIATE takes the write lock.
            engine = create_engine(
                self.url,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "isolation_level": None},
                poolclass=NullPool,
            )
            event.listen(engine, "connect", _sqlite_pragmas)
            event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
        try:
            for attempt in range(LOCK_RETRIES):
                try:
                    with engine.begin() as connection:
                        if connection.dialect.name == "postgresql":
                            connection.execute(
                                text("SELECT pg_advisory_xact_lock(:key)"), {"key": POSTGRES_CREATE_LOCK}
                            )
                        return apply(connection, read_state(connection, self.where))
                except (OperationalError, IntegrityError, ProgrammingError) as error:
                    message = str(error).lower()
                    transient = "already exists" in message or "duplicate" in message or "locked" in message
                    if not transient or attempt == LOCK_RETRIES - 1:
                        if self.is_sqlite and isinstance(error, OperationalError) and not transient:
                            path = sqlite_file(self.url)
                            if path is not None:
                                raise UnusableDatabase(_sqlite_open_problem(path, error)) from error
                        raise
                    time.sleep(0.05 * (attempt + 1))
            raise AssertionError("unreachable")
        finally:
            if engine is not self.engine:
                engine.dispose()

    @property
    def optuna_url(self) -> str:
        """The URL Optuna's RDB storage takes for the same database."""
        return self.url

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One short transaction: committed on success, rolled back on any error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def run(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in one transaction, retrying it when SQLite reports the database locked."""
        return retry(
            lambda: self._once(work),
            attempts=LOCK_RETRIES,
            transient=lambda error: isinstance(error, OperationalError) and _is_lock_error(error),
        )

    def _once(self, work: Callable[[Session], T]) -> T:
        with self.session() as session:
            return work(session)

    def dispose(self) -> None:
        self.engine.dispose()


def _first_line(error: BaseException) -> str:
    orig = getattr(error, "orig", None)
    return (str(orig) if orig is not None else str(error)).strip().splitlines()[0]


def _sqlite_open_problem(path: Path, error: BaseException) -> str:
    """SQLite's own words are terse ("unable to open database file"); say what it needed."""
    detail = _first_line(error)
    folder = path.resolve().parent
    if "unable to open" in detail.lower() and not os.access(folder, os.W_OK):
        return (
            f"{path}: cannot open it ({detail}): the harness keeps SQLite in WAL mode, which writes "
            f"{path.name}-wal and {path.name}-shm beside the file, and the folder {folder} is not "
            "writable; copy the database to a writable folder (or make this one writable)"
        )
    if "not a database" in detail.lower() or "malformed" in detail.lower():
        return f"{path}: not a readable database ({detail}); is it the right file, or damaged?"
    return f"{path}: cannot open it as a SQLite database ({detail})"


def _sqlite_reader_pragmas(dbapi_connection: object, _record: object) -> None:
    # No journal_mode here: a command that only reads must not change the file.
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
