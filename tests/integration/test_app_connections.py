"""Enqueue on the application's connection in the states and
configurations an application may hand it over in: pipeline mode, a
cursor_factory of its own, savepoints rolled back, idempotency keys raced
by two transactions. The job exists if and only if the application's
transaction commits, and only then are workers woken."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import psycopg
import pytest

import pulsed
from tests.pg import wait_until


def count_jobs(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pulse_jobs").fetchone()[0]


@pytest.fixture
def listener(dsn: str) -> Iterator[psycopg.Connection]:
    """A connection LISTENing to the channel idle workers wait on."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("LISTEN pulse_jobs")
        yield connection


def wake_ups(listener: psycopg.Connection, timeout: float = 0.5) -> list[str]:
    """The queues woken so far (waits up to `timeout` for the first)."""
    return [n.payload for n in listener.notifies(timeout=timeout, stop_after=100)]


# -- pipeline mode --------------------------------------------------------------


def test_enqueue_in_pipeline_mode(dsn: str, conn: psycopg.Connection,
                                  listener: psycopg.Connection) -> None:
    # A result in pipeline mode arrives only when fetched: enqueue read the
    # not-yet-fetched insert as "key held", looked for a holder, inserted
    # again, and gave up after 10 rounds with a RuntimeError.
    with psycopg.connect(dsn) as app:
        with app.pipeline():
            first = pulsed.enqueue(app, "email", {"n": 1})
            keyed = pulsed.enqueue(app, "email", {"n": 2}, idempotency_key="k")
            again = pulsed.enqueue(app, "email", {"n": 3}, idempotency_key="k")
            many = pulsed.enqueue_many(app, [{"type": "email", "queue": "bulk"},
                                             {"type": "email", "idempotency_key": "k"}])
        assert count_jobs(conn) == 0 and wake_ups(listener, 0.1) == []
        app.commit()
    assert again == keyed and many[1] == keyed and len({first, keyed, many[0]}) == 3
    assert count_jobs(conn) == 3
    assert sorted(set(wake_ups(listener))) == ["bulk", "default"]


def test_enqueue_async_in_pipeline_mode(dsn: str, conn: psycopg.Connection) -> None:
    async def enqueue() -> tuple[int, int, list[int]]:
        async with await psycopg.AsyncConnection.connect(dsn) as app:
            async with app.pipeline():
                keyed = await pulsed.enqueue_async(app, "email", idempotency_key="k")
                again = await pulsed.enqueue_async(app, "email", idempotency_key="k")
                many = await pulsed.enqueue_many_async(app, [{"type": "email"}])
            await app.commit()
            return keyed, again, many

    keyed, again, many = asyncio.run(enqueue())
    assert keyed == again and count_jobs(conn) == 2 and len(many) == 1


# -- the application's cursor_factory --------------------------------------------


@pytest.mark.parametrize("factory", [psycopg.RawCursor, psycopg.ClientCursor])
def test_enqueue_with_the_applications_cursor_factory(dsn: str, conn: psycopg.Connection,
                                                      factory: type) -> None:
    # A RawCursor takes $1 placeholders: Pulse's %(name)s statements on it
    # failed with "raw queries require a sequence of parameters".
    with psycopg.connect(dsn, cursor_factory=factory) as app:
        keyed = pulsed.enqueue(app, "email", {"n": 1}, idempotency_key="k")
        again = pulsed.enqueue(app, "email", {"n": 1}, idempotency_key="k")
        many = pulsed.enqueue_many(app, [{"type": "email"},
                                         {"type": "email", "idempotency_key": "k"}])
        app.commit()
    assert keyed == again == many[1] and count_jobs(conn) == 2


@pytest.mark.parametrize("factory", [psycopg.AsyncRawCursor, psycopg.AsyncClientCursor])
def test_enqueue_async_with_the_applications_cursor_factory(dsn: str, conn: psycopg.Connection,
                                                            factory: type) -> None:
    async def enqueue() -> tuple[int, list[int]]:
        async with await psycopg.AsyncConnection.connect(dsn, cursor_factory=factory) as app:
            keyed = await pulsed.enqueue_async(app, "email", idempotency_key="k")
            many = await pulsed.enqueue_many_async(
                app, [{"type": "email"}, {"type": "email", "idempotency_key": "k"}])
            await app.commit()
            return keyed, many

    keyed, many = asyncio.run(enqueue())
    assert many[1] == keyed and count_jobs(conn) == 2


# -- savepoints and racing idempotency keys -------------------------------------


def test_savepoints_rolled_back_at_each_level(dsn: str, conn: psycopg.Connection,
                                             listener: psycopg.Connection) -> None:
    with psycopg.connect(dsn) as app:
        with app.transaction():
            pulsed.enqueue(app, "email", queue="outer")
            with pytest.raises(ZeroDivisionError):
                with app.transaction():
                    pulsed.enqueue(app, "email", queue="inner", idempotency_key="k")
                    with app.transaction():
                        pulsed.enqueue_many(app, [{"type": "email", "queue": "innermost",
                                                   "idempotency_key": "m"}])
                    1 / 0
            with pytest.raises(ZeroDivisionError):
                with app.transaction():
                    pulsed.enqueue_many(app, [{"type": "email", "queue": "inner",
                                               "idempotency_key": "m"}])
                    1 / 0
            # the keys the rolled-back savepoints took are free again
            keyed = pulsed.enqueue(app, "email", queue="after", idempotency_key="k")
            [many] = pulsed.enqueue_many(app, [{"type": "email", "queue": "after",
                                                "idempotency_key": "m"}])
            assert count_jobs(conn) == 0 and wake_ups(listener, 0.1) == []
    assert keyed != many and count_jobs(conn) == 3
    assert sorted(set(wake_ups(listener))) == ["after", "outer"]
    assert wake_ups(listener, 0.1) == []  # nothing for the rolled-back queues


@pytest.mark.parametrize("bulk", [False, True])
def test_a_key_racing_a_transaction_that_rolls_back_is_created(
        dsn: str, conn: psycopg.Connection, bulk: bool) -> None:
    # The second transaction waits on the first's uncommitted key; when the
    # first rolls back, the second's job must be created, not lost.
    def enqueue(app: psycopg.Connection) -> int:
        if bulk:
            return pulsed.enqueue_many(app, [{"type": "email", "idempotency_key": "k"}])[0]
        return pulsed.enqueue(app, "email", idempotency_key="k")

    with psycopg.connect(dsn) as first, psycopg.connect(dsn) as second:
        enqueue(first)
        got: list[int] = []
        thread = threading.Thread(target=lambda: (got.append(enqueue(second)), second.commit()))
        thread.start()
        wait_until(lambda: conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
            (second.info.backend_pid,)).fetchone())
        first.rollback()
        thread.join(10)
    assert not thread.is_alive()
    assert conn.execute("SELECT id FROM pulse_jobs WHERE idempotency_key = 'k'"
                        ).fetchall() == [(got[0],)]


# -- another driver's connection passed by mistake ------------------------------


def _stand_in(module: str, name: str) -> object:
    """An object of a class named as another driver's connection class is
    (psycopg2 and asyncpg are not installed here: only the name matters)."""
    return type(name, (), {"__module__": module})()


@pytest.mark.parametrize(("module", "name"), [("psycopg2.extensions", "connection"),
                                              ("asyncpg.connection", "Connection")])
def test_another_drivers_connection_is_named(conn: psycopg.Connection, module: str,
                                             name: str) -> None:
    # The bare class name ("got Connection" for asyncpg's) read as the
    # very thing the message asked for.
    other = _stand_in(module, name)
    with pytest.raises(TypeError, match=rf"psycopg 3 Connection .*got {module}\.{name}$"):
        pulsed.enqueue(other, "email")
    with pytest.raises(TypeError, match=rf"psycopg 3 Connection .*got {module}\.{name}$"):
        pulsed.enqueue_many(other, [{"type": "email"}])
    with pytest.raises(TypeError, match=rf"psycopg 3 AsyncConnection .*got {module}\.{name}$"):
        asyncio.run(pulsed.enqueue_async(other, "email"))
    with pytest.raises(TypeError, match=r"got str$"):
        pulsed.enqueue("postgresql://", "email")  # type: ignore[arg-type]
    assert count_jobs(conn) == 0
