"""Defaults a DBA or a host sets on Pulse's database or role (ALTER DATABASE
/ ALTER ROLE ... SET), which every new session inherits unless Pulse pins
its own value: each Pulse connection reads its values back the way psycopg
parses them, whatever the database says."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

import pulsed
from pulsed.api import HandlerRegistry
from pulsed.db.connect import ROLES, connect
from pulsed.db.migrate import migrate
from pulsed.errors import MigrationError


def alter_database(dsn: str, **settings: str) -> None:
    """ALTER DATABASE <this test's database> SET name = value, for each:
    sessions opened from now on inherit them."""
    name = conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for setting, value in settings.items():
            conn.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                sql.Identifier(name), sql.Identifier(setting), sql.Literal(value)))


# Each: what the database says, and a value psycopg cannot read back
# in that form (or reads back wrong).
UNREADABLE = [
    ("DateStyle", "SQL, DMY"), ("DateStyle", "German"), ("DateStyle", "Postgres, MDY"),
    ("IntervalStyle", "sql_standard"), ("IntervalStyle", "postgres_verbose"),
    ("extra_float_digits", "-15"),
]


@pytest.mark.parametrize("setting, value", UNREADABLE)
def test_every_role_reads_times_intervals_and_floats_whatever_the_database_default(
        dsn: str, setting: str, value: str) -> None:
    alter_database(dsn, **{setting: value})
    moment = datetime(2031, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    for name in ROLES:
        with connect(dsn, name) as opened:
            row = opened.execute(
                "SELECT %s::timestamptz, interval '1 day 02:03:04.5', 45::real, 0.1::float8",
                (moment,)).fetchone()
        assert row == (moment, timedelta(days=1, hours=2, minutes=3, seconds=4.5), 45.0, 0.1), \
            f"role {name} under {setting} = {value!r}"


def test_a_claimed_jobs_timeout_has_all_its_digits(dsn: str, conn: psycopg.Connection) -> None:
    """timeout_s is a real: at extra_float_digits = -15 the server sends it
    with one significant digit, and a 45 s timeout was read back as 40 s."""
    alter_database(dsn, extra_float_digits="-15")
    ids = [pulsed.enqueue(conn, "t", {}, timeout=45), pulsed.enqueue(conn, "t", {}, timeout=1.5)]
    seen: dict[int, float | None] = {}
    registry = HandlerRegistry()
    registry.register("t", lambda job: seen.__setitem__(job.id, job.timeout))
    assert pulsed.run_worker(dsn, registry=registry, prefetch=2) == 2
    assert seen == {ids[0]: 45.0, ids[1]: 1.5}


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
def test_every_role_runs_read_committed_whatever_the_database_default(
        dsn: str, isolation: str) -> None:
    """Pulse's claims are written for READ COMMITTED (SKIP LOCKED, an
    UPDATE re-reading a row changed under it); above it, workers side by
    side failed with serialization errors they took for a lost connection
    (tests/system/test_database_settings.py runs them)."""
    alter_database(dsn, default_transaction_isolation=isolation)
    for name in ROLES:
        with connect(dsn, name) as opened:
            assert opened.execute("SHOW transaction_isolation").fetchone()[0] == \
                "read committed", f"role {name}"


def test_a_read_only_database_default_is_named_when_migrating(dsn: str) -> None:
    """PostgreSQL says only 'cannot execute CREATE TABLE in a read-only
    transaction': the setting, where it comes from and the way out are
    Pulse's to say."""
    alter_database(dsn, default_transaction_read_only="on")
    with connect(dsn, "start") as opened, pytest.raises(MigrationError) as caught:
        migrate(opened)
    message = str(caught.value)
    assert "read-only transaction" in message
    assert "default_transaction_read_only is on" in message
    name = conninfo_to_dict(dsn)["dbname"]
    assert f"ALTER DATABASE {name} SET default_transaction_read_only = off" in message


@pytest.mark.parametrize("path, shown", [("nosuchschema", "nosuchschema"),
                                         ("$user", '"$user"')])
def test_a_search_path_naming_no_schema_is_named_when_migrating(dsn: str, path: str,
                                                                shown: str) -> None:
    """PostgreSQL says only 'no schema has been selected to create in'."""
    alter_database(dsn, search_path=path)
    with connect(dsn, "start") as opened, pytest.raises(MigrationError) as caught:
        migrate(opened)
    assert f"search_path is {shown} and names no schema that exists" in str(caught.value)
    assert "options=-c search_path=public" in str(caught.value)
