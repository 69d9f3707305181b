"""The Store is the error boundary: a connection the server ends surfaces
from any Store method as StoreUnavailable (a StoreError carrying the
driver's error), while a statement's own error on a live connection keeps
its psycopg class."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from pulsed.db.store import Store
from pulsed.errors import StoreError, StoreUnavailable


@pytest.fixture
def victim(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


def terminate(conn: psycopg.Connection, victim: psycopg.Connection) -> None:
    pid = victim.info.backend_pid
    conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))


@pytest.mark.parametrize("call", [
    lambda store: store.claim(owner="w", limit=5, lease_ttl=30.0),
    lambda store: store.get_job(1),
    lambda store: store.queue_depths(),
    lambda store: store.cancel(1),
], ids=["claim", "get_job", "queue_depths", "cancel"])
def test_a_terminated_connection_is_store_unavailable(conn, victim, call) -> None:
    store = Store(victim)
    store.queue_depths()  # the connection works
    terminate(conn, victim)
    with pytest.raises(StoreUnavailable) as info:
        call(store)
    error = info.value
    assert isinstance(error, StoreError)
    assert isinstance(error, psycopg.OperationalError)  # callers written against psycopg
    assert isinstance(error.cause, (psycopg.OperationalError, psycopg.InterfaceError))
    assert error.__cause__ is error.cause
    assert error.operation.startswith("Store.") and "database unavailable" in str(error)


def test_a_closed_connection_is_store_unavailable(victim) -> None:
    victim.close()
    with pytest.raises(StoreUnavailable) as info:
        Store(victim).queue_depths()
    assert "closed" in str(info.value.cause)


def test_a_statement_error_on_a_live_connection_keeps_its_class(conn, victim) -> None:
    """A lock timeout is the statement's (its caller retries it next round),
    not a lost database."""
    with conn.transaction():
        conn.execute("LOCK TABLE pulse_jobs IN ACCESS EXCLUSIVE MODE")
        victim.execute("SET lock_timeout = '50ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable) as info:
            Store(victim).queue_depths()
    assert not isinstance(info.value, StoreError)
    assert Store(victim).queue_depths() == []  # and the connection still works
