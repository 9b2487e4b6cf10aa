"""Suite-wide settings.

Unit tests run torch on one thread: their tensors are tiny, and on a 2-core machine shared with a
second process (the concurrent-runner tests start several) two OpenMP threads stall at every
parallel region whenever one is descheduled. Benchmarks (tests/benchmarks/) keep torch's default
threads, since they measure the machine as a user would run it.

PostgreSQL: ``postgres_url`` gives each test a fresh database on the server that
``HARNESS_TEST_POSTGRES_URL`` names (an account allowed to create databases); ``bash scripts/setup.sh
test`` starts a throwaway server and sets it. Without it those tests are skipped, and say why.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (``HYPOTHESIS_PROFILE=explore`` draws fresh
# ones): a CI run must not pass or fail by the luck of the draw.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

BENCHMARKS = os.path.join("tests", "benchmarks")
POSTGRES_ENV = "HARNESS_TEST_POSTGRES_URL"


@pytest.fixture(autouse=True)
def _one_thread_for_unit_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    if BENCHMARKS in str(request.node.path):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL of a new, empty PostgreSQL database, dropped after the test."""
    admin_url = os.environ.get(POSTGRES_ENV)
    if not admin_url:
        pytest.skip(f"no PostgreSQL server: set {POSTGRES_ENV} (`bash scripts/setup.sh test` starts one)")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from harness.db import resolve_url

    name = f"harness_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(resolve_url(admin_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test against a SQLite file and against PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'h.db'}"
    return request.getfixturevalue("postgres_url")
