"""Migrations against a fresh, empty database: applied once, and only once."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from pulsed.db.migrate import available_migrations, current_version, migrate
from tests.pg import create_database, drop_database, unique_name

TABLES = [
    "pulse_jobs",
    "pulse_job_attempts",
    "pulse_leader",
    "pulse_processes",
    "pulse_paused_queues",
    "pulse_cron_ticks",
]


@pytest.fixture
def empty_dsn(admin_dsn: str) -> Iterator[str]:
    """A database never migrated (copied from template0, not the test template)."""
    name = unique_name("pulse_empty")
    yield create_database(admin_dsn, name, template="template0")
    drop_database(admin_dsn, name)


def existing_tables(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row[0] for row in rows}


def test_migrate_applies_version_1_and_creates_the_tables(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert current_version(conn) is None

        applied = migrate(conn)

        assert applied[0] == 1
        assert applied == [m.version for m in available_migrations()]
        assert current_version(conn) == applied[-1]
        assert set(TABLES) <= existing_tables(conn)


def test_migrate_twice_changes_nothing(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        migrate(conn)
        version, tables = current_version(conn), existing_tables(conn)

        assert migrate(conn) == []

        assert current_version(conn) == version
        assert existing_tables(conn) == tables


def test_concurrent_migrations_apply_the_schema_once(empty_dsn: str) -> None:
    start = threading.Barrier(2, timeout=10)
    applied: list[list[int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(empty_dsn, autocommit=True) as conn:
                start.wait()
                applied.append(migrate(conn))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "a migration never finished"

    assert errors == []
    # Each migration commits on its own (pulsed/db/migrate.py): the two may
    # take turns, but between them each version is applied once, in order.
    assert all(run == sorted(run) for run in applied)
    assert sorted(applied[0] + applied[1]) == [m.version for m in available_migrations()]
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT version, count(*) FROM pulse_migrations GROUP BY version")
        assert all(count == 1 for _, count in rows)
        assert set(TABLES) <= existing_tables(conn)


def test_each_test_gets_a_migrated_database(conn: psycopg.Connection) -> None:
    assert current_version(conn) == available_migrations()[-1].version
    assert set(TABLES) <= existing_tables(conn)
    conn.execute("CREATE TABLE scratch (id int)")  # gone for the next test


def test_per_test_databases_are_independent(conn: psycopg.Connection) -> None:
    assert "scratch" not in existing_tables(conn)
