"""Fixtures shared by the integration tests."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql


@pytest.fixture
def fast_commits(dsn: str) -> None:
    """The test database is thrown away afterwards: its commits need not
    wait for the disk (for sessions opened from now on; the embedded test
    server runs without fsync anyway, a shared one may not)."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(
            sql.Identifier(admin.info.dbname)))
