"""The only place that opens database connections and sessions.

SQLite (the default, ``results/harness.db``) is opened in WAL mode with a busy timeout, so several
``harness run`` processes can share one file; any other SQLAlchemy URL works as is. PostgreSQL
(``postgresql://`` with psycopg 3, the ``postgres`` extra) is tested like SQLite (tests/test_postgres.py).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from harness.db.models import Base

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


def open_existing(url: str | Path | None) -> Database:
    """The database for reading, without creating it or its tables: FileNotFoundError when a SQLite
    file does not exist (a mistyped path must not come back as an empty result and a stray file)."""
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise FileNotFoundError(f"no database at {path} (check the path; `harness run STUDY.yaml` creates one)")
    return Database(url, create=False)


def _is_lock_error(error: OperationalError) -> bool:
    message = str(error.orig).lower() if error.orig is not None else str(error).lower()
    return "locked" in message or "busy" in message


class Database:
    """A connection pool and session factory for one database URL; creates the tables on first use."""

    def __init__(self, url: str | Path | None = None, *, create: bool = True) -> None:
        self.url = resolve_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        if self.is_sqlite:
            path = self.url.split("///", 1)[1] if "///" in self.url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(
            self.url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000} if self.is_sqlite else {},
        )
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if create:
            self._create_tables()

    def _create_tables(self) -> None:
        """create_all checks, then creates: several processes opening a fresh database at the same
        moment (a job array starting on one PostgreSQL server) can all try. On PostgreSQL an
        advisory lock makes them take turns, so the later ones find the tables; elsewhere the loser
        sees "already exists" (or a duplicate catalog row) once the winner committed, and retries."""

        def create(session: Session) -> None:
            connection = session.connection()
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": POSTGRES_CREATE_LOCK})
            Base.metadata.create_all(connection)

        for attempt in range(LOCK_RETRIES):
            try:
                self.run(create)
                return
            except (OperationalError, IntegrityError, ProgrammingError) as error:
                message = str(error).lower()
                if ("already exists" not in message and "duplicate" not in message) or attempt == LOCK_RETRIES - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

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
        for attempt in range(LOCK_RETRIES):
            try:
                with self.session() as session:
                    return work(session)
            except OperationalError as error:
                if not _is_lock_error(error) or attempt == LOCK_RETRIES - 1:
                    raise
                time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
