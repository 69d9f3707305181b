"""The test bed: one PostgreSQL server per session, one database per test.

The server is ``PULSE_TEST_DSN`` when set, otherwise an embedded server in a
temporary directory. Fixtures are lazy: a run that asks for no database (say
``pytest tests/unit``) starts nothing.

Fixtures:
    admin_dsn    session  superuser DSN on the test server, for tests that
                          create databases themselves
    template_db  session  name of a migrated database, unique to this session
    dsn          function DSN of a fresh database copied from the template,
                          dropped after the test
    conn         function autocommit psycopg connection to ``dsn``
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pulsed.db.embedded import EmbeddedPostgres
from pulsed.db.migrate import migrate
from tests.pg import create_database, drop_database, unique_name

TEST_DSN_ENV = "PULSE_TEST_DSN"
# A throwaway server gains nothing from durability, and every per-test
# CREATE DATABASE pays for it.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    """A superuser DSN: PULSE_TEST_DSN, or an embedded server started now."""
    if url := os.environ.get(TEST_DSN_ENV):
        yield url
        return
    # Our own directory in /tmp, not pytest's tmp_path: that one is mode 0700
    # and, as root, the server's unprivileged account must pass through it.
    root = Path(tempfile.mkdtemp(prefix="pulse-test-pg-"))
    server = EmbeddedPostgres(root / "data", settings=FAST_SETTINGS)
    try:
        server.start()
        yield server.dsn("postgres")
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(admin_dsn: str) -> Iterator[str]:
    """A migrated database, named uniquely so concurrent sessions don't collide."""
    name = unique_name("pulse_tpl")
    template_dsn = create_database(admin_dsn, name)
    try:
        with psycopg.connect(template_dsn, autocommit=True) as conn:
            migrate(conn)
        # No connection may stay open: CREATE DATABASE … TEMPLATE needs it idle.
        yield name
    finally:
        drop_database(admin_dsn, name)


@pytest.fixture
def dsn(admin_dsn: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for this test alone."""
    name = unique_name("pulse_test")
    yield create_database(admin_dsn, name, template=template_db)
    drop_database(admin_dsn, name)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to this test's database."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection

