"""The schema version of the results database and the ordered migrations that upgrade it.

Version 1 is the schema wave 1 wrote (no version table; recognised by its tables' columns).
Every later version is one :class:`Migration` in :data:`MIGRATIONS`. A database records the
versions it went through in ``harness_schema_version`` (one row per version, with the time), so
its version is the largest row. docs/DATABASE.md describes the rules for users and for whoever
adds a migration; the short form:

- a fresh database is created at :data:`SCHEMA_VERSION` directly (``create_all``, then stamped);
- an older one is upgraded in place, in one transaction under a lock (SQLite ``BEGIN IMMEDIATE``,
  PostgreSQL an advisory lock), each migration in order, then checked against the models;
- a newer one (its version above :data:`SCHEMA_VERSION`) is refused, and so is one whose
  ``harness_*`` tables lack the columns its version must have (another program's tables): both
  are found by reading only, before anything is written.

Migrations only add (tables, nullable columns, indexes): an older harness can still run on an
upgraded database until it meets a newer version, which it then refuses. To add one: change the
model in ``models.py``, then append ``Migration(N + 1, "what", add_columns={table: (names,)})``
(or ``add_tables=(...)``, or ``run=function`` for anything else, such as filling a new column).
The column definitions are taken from the models, so a type is written once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, inspect, select
from sqlalchemy.exc import DBAPIError

from harness.db.errors import NewerSchema, NotHarnessDatabase, UnusableDatabase, UpgradeNeeded
from harness.db.models import Base, SchemaVersionRow, utcnow

TABLE_PREFIX = "harness_"
VERSION_TABLE = SchemaVersionRow.__tablename__


@dataclass(frozen=True)
class Migration:
    """One step from version ``version - 1`` to ``version``.

    ``add_tables`` and ``add_columns`` name tables and columns of the current models (their
    definitions are copied from there); ``run`` does anything else, after them, in the same
    transaction. Adding a column that is already there, or a table that exists, is skipped, so
    a migration is correct whatever later migrations add to the same tables."""

    version: int
    summary: str
    add_tables: tuple[str, ...] = ()
    add_columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    run: Callable[[Any], None] | None = None  # receives alembic.operations.Operations


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "wave-1 schema: harness_study, harness_trial, harness_metric, harness_bench"),
    Migration(2, "record the schema version (harness_schema_version)", add_tables=(VERSION_TABLE,)),
    Migration(3, "evaluations of saved encoders (harness_evaluation)", add_tables=("harness_evaluation",)),
    Migration(4, "Slurm jobs of a study (harness_slurm_job)", add_tables=("harness_slurm_job",)),
    Migration(
        5,
        "checkpoints and weights of a trial (harness_trial.checkpoint_dir, weights_path, weights_sha256)",
        add_columns={"harness_trial": ("checkpoint_dir", "weights_path", "weights_sha256")},
    ),
    Migration(6, "what each trial trained and evaluated on (harness_trial.data)", add_columns={"harness_trial": ("data",)}),
)
SCHEMA_VERSION = MIGRATIONS[-1].version
CREATED = "created at this version"  # the summary of a fresh database's only version row


def declaration_problems(migrations: tuple[Migration, ...] = MIGRATIONS) -> list[str]:
    """What is wrong with the list (a test asserts none): versions 1, 2, 3, ... in order, and
    only tables and columns the models have, new columns nullable or with a server default."""
    problems: list[str] = []
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            problems.append(f"migration #{expected} is version {migration.version}, expected {expected}")
        for table in migration.add_tables:
            if table not in Base.metadata.tables:
                problems.append(f"migration {migration.version} adds table {table}, which models.py lacks")
        for table, columns in migration.add_columns.items():
            model = Base.metadata.tables.get(table)
            for column in columns:
                if model is None or column not in model.c:
                    problems.append(f"migration {migration.version} adds {table}.{column}, which models.py lacks")
                elif not model.c[column].nullable and model.c[column].server_default is None:
                    problems.append(
                        f"migration {migration.version} adds {table}.{column}, which must be nullable or "
                        "have a server default (existing rows get no value)"
                    )
    return problems


def required_columns(version: int) -> dict[str, set[str]]:
    """The columns each harness table has at ``version`` (derived from the models and the
    migrations after it); a table missing from the result did not exist yet."""
    tables = {name: {c.name for c in table.columns} for name, table in Base.metadata.tables.items()}
    for migration in MIGRATIONS:
        if migration.version <= version:
            continue
        for table in migration.add_tables:
            tables.pop(table, None)
        for table, columns in migration.add_columns.items():
            if table in tables:
                tables[table] -= set(columns)
    return tables


@dataclass(frozen=True)
class SchemaState:
    """What a database holds, read without writing anything."""

    where: str  # the database, for messages (a path, or a URL without its password)
    version: int | None  # None: no harness tables at all (a fresh or foreign database)
    tables: Mapping[str, set[str]]  # harness_* table -> its columns
    history: tuple[tuple[int, str, datetime | None], ...] = ()

    @property
    def fresh(self) -> bool:
        return self.version is None

    @property
    def current(self) -> bool:
        return self.version == SCHEMA_VERSION

    @property
    def pending(self) -> tuple[Migration, ...]:
        start = 0 if self.version is None else self.version
        return tuple(m for m in MIGRATIONS if m.version > start)


def read_state(connection: Connection, where: str) -> SchemaState:
    """The database's harness tables and schema version, or a DatabaseProblem: another program's
    ``harness_*`` tables (:class:`NotHarnessDatabase`), a newer harness's (:class:`NewerSchema`),
    or not readable as a database at all (:class:`UnusableDatabase`). Reads only."""
    try:
        inspector = inspect(connection)
        names = [n for n in inspector.get_table_names() if n.startswith(TABLE_PREFIX)]
        tables = {n: {c["name"] for c in inspector.get_columns(n)} for n in names}
    except DBAPIError as error:
        raise UnusableDatabase(
            f"{where}: not a readable database ({_detail(error)}); is it the right file, or damaged?"
        ) from error
    if not tables:
        return SchemaState(where, None, {})
    history: tuple[tuple[int, str, datetime | None], ...] = ()
    if VERSION_TABLE in tables:
        _require_columns(where, tables, {VERSION_TABLE: required_columns(SCHEMA_VERSION)[VERSION_TABLE]}, None)
        rows = connection.execute(
            select(SchemaVersionRow.version, SchemaVersionRow.summary, SchemaVersionRow.applied_at).order_by(
                SchemaVersionRow.version
            )
        ).all()
        history = tuple((int(r.version), str(r.summary), r.applied_at) for r in rows)
        if not history:
            raise NotHarnessDatabase(f"{where}: its {VERSION_TABLE} table is empty; it was not written by the harness")
        version = history[-1][0]
    else:
        version = 1  # wave 1 wrote no version; its tables' columns say whether they are ours
    if version > SCHEMA_VERSION:
        raise NewerSchema(
            f"{where}: the database has schema version {version}, written by a newer harness; this one "
            f"knows versions up to {SCHEMA_VERSION}. Update the harness (git pull; pip install -e .) to "
            "use it; nothing was changed"
        )
    _require_columns(where, tables, required_columns(version), version)
    return SchemaState(where, version, tables, history)


def _require_columns(
    where: str, tables: Mapping[str, set[str]], required: Mapping[str, set[str]], version: int | None
) -> None:
    problems = [
        f"{name} lacks {', '.join(sorted(required[name] - columns))}"
        for name, columns in sorted(tables.items())
        if name in required and not required[name] <= columns
    ]
    if problems:
        at = f" of schema version {version}" if version is not None else ""
        raise NotHarnessDatabase(
            f"{where}: its harness_* tables are not the harness's{at} ({'; '.join(problems)}); it "
            "belongs to another program or was changed by hand. Nothing was written; use another --db"
        )


def _detail(error: DBAPIError) -> str:
    return str(error.orig).strip() if error.orig is not None else str(error)


def require_current(state: SchemaState, url_hint: str) -> None:
    """For commands that only read: refuse an older schema, naming the upgrade command."""
    if state.fresh or state.current:
        return
    raise UpgradeNeeded(
        f"{state.where}: the database has schema version {state.version}; this harness uses version "
        f"{SCHEMA_VERSION}. Upgrade it in place (nothing is lost): harness db upgrade{url_hint} "
        "(any `harness run` on it upgrades it too)"
    )


def apply(connection: Connection, state: SchemaState) -> tuple[Migration, ...]:
    """Bring the database of ``state`` (read under the same lock, in the same transaction as
    ``connection``) to :data:`SCHEMA_VERSION`; returns the migrations applied (none for a fresh
    database, which is created at the current version)."""
    if state.fresh:
        Base.metadata.create_all(connection)
        _stamp(connection, SCHEMA_VERSION, CREATED)
        return ()
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    operations = Operations(MigrationContext.configure(connection))
    applied = state.pending
    for migration in applied:
        present = set(inspect(connection).get_table_names())
        for table in migration.add_tables:
            if table not in present:
                Base.metadata.tables[table].create(connection)
                present.add(table)
        for table, columns in migration.add_columns.items():
            if table not in present:
                continue  # created with all its columns at the end
            have = {c["name"] for c in inspect(connection).get_columns(table)}
            for column in columns:
                if column not in have:
                    operations.add_column(table, Base.metadata.tables[table].c[column]._copy())
        if migration.run is not None:
            migration.run(operations)
        if migration.version > 1:
            _stamp(connection, migration.version, migration.summary)
    # Tables that an older harness had not created yet (none in practice: wave 1 made all four).
    Base.metadata.create_all(connection)
    after = read_state(connection, state.where)
    if not after.current:
        raise AssertionError(f"{state.where}: upgraded to version {after.version}, expected {SCHEMA_VERSION}")
    return applied


def _stamp(connection: Connection, version: int, summary: str) -> None:
    connection.execute(
        SchemaVersionRow.__table__.insert().values(version=version, summary=summary, applied_at=utcnow())
    )

