"""pulsed.enqueue and friends on SQLAlchemy 2 (a real engine on psycopg 3,
the test database): the job is written in the session's own transaction,
beside an application table's row. Commit keeps both, rollback drops both."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")
pytest.importorskip("greenlet")  # SQLAlchemy's asyncio support

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine  # noqa: E402
from sqlalchemy.orm import Session, scoped_session, sessionmaker  # noqa: E402

import pulsed  # noqa: E402


@pytest.fixture
def app_dsn(dsn: str, conn: psycopg.Connection) -> str:
    """The test database with an application table."""
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    return dsn


@pytest.fixture
def engine(app_dsn: str) -> Iterator[Any]:
    # creator: the test DSN may be any libpq form; the URL names the dialect
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(app_dsn))
    yield engine
    engine.dispose()


def async_engine(dsn: str) -> Any:
    return create_async_engine("postgresql+psycopg_async://",
                               async_creator=lambda: psycopg.AsyncConnection.connect(dsn))


def rows(conn: psycopg.Connection) -> tuple[list[int], list[str]]:
    orders = [r[0] for r in conn.execute("SELECT id FROM orders ORDER BY id")]
    jobs = [r[0] for r in conn.execute("SELECT type FROM pulse_jobs ORDER BY id")]
    return orders, jobs


def test_session_commit_keeps_the_job_with_the_application_row(
        engine: Any, conn: psycopg.Connection) -> None:
    with Session(engine) as session:
        session.execute(text("INSERT INTO orders VALUES (1)"))
        job_id = pulsed.enqueue(session, "ship", {"order": 1})
        ids = pulsed.enqueue_many(session, [{"type": "invoice"}, {"type": "email"}])
        # Written by the session's transaction, not a second one.
        xid = session.execute(text("SELECT pg_current_xact_id()::text::bigint")).scalar()
        xmins = session.execute(text("SELECT DISTINCT xmin::text::bigint FROM pulse_jobs")).all()
        assert xmins == [(xid,)]
        assert rows(conn) == ([], [])  # nothing visible before the commit
        session.commit()
    assert rows(conn) == ([1], ["ship", "invoice", "email"])
    assert len({job_id, *ids}) == 3


def test_session_rollback_drops_the_job_with_the_application_row(
        engine: Any, conn: psycopg.Connection) -> None:
    with Session(engine) as session:
        session.execute(text("INSERT INTO orders VALUES (1)"))
        pulsed.enqueue(session, "ship")
        session.rollback()
        # The session goes on: a new transaction, committed.
        pulsed.enqueue(session, "after")
        session.commit()
    with sessionmaker(engine).begin() as session:  # commits on leaving
        pulsed.enqueue(session, "begun")
    assert rows(conn) == ([], ["after", "begun"])


class AppSession(Session):
    """An application's own Session class, in a module not SQLAlchemy's."""


def test_scoped_session_and_a_session_subclass(engine: Any, conn: psycopg.Connection) -> None:
    scoped = scoped_session(sessionmaker(engine))
    pulsed.enqueue(scoped, "scoped")
    scoped.commit()
    scoped.remove()
    with AppSession(engine) as session:
        pulsed.enqueue(session, "subclass")
        session.commit()
    assert rows(conn) == ([], ["scoped", "subclass"])


def test_connection_enqueue_first_then_commit(engine: Any, conn: psycopg.Connection) -> None:
    """A Connection with no statement yet: the enqueue begins SQLAlchemy's
    transaction, so its commit() commits the job (else it would do nothing
    and the pool's reset would roll the job back)."""
    with engine.connect() as connection:
        pulsed.enqueue(connection, "first")
        assert connection.in_transaction()
        connection.execute(text("INSERT INTO orders VALUES (2)"))
        connection.commit()
        pulsed.enqueue_many(connection, [{"type": "dropped"}])
        connection.rollback()
    with engine.begin() as connection:
        pulsed.enqueue(connection, "begun")
    assert rows(conn) == ([2], ["first", "begun"])


def test_an_engine_on_another_driver_is_named(conn: psycopg.Connection) -> None:
    with Session(create_engine("sqlite://")) as session:
        with pytest.raises(TypeError, match=r"postgresql\+psycopg://.*sqlite3"):
            pulsed.enqueue(session, "t")
    assert rows_of_jobs(conn) == []


def rows_of_jobs(conn: psycopg.Connection) -> list[Any]:
    return conn.execute("SELECT id FROM pulse_jobs").fetchall()


def test_async_session_commit_and_rollback(app_dsn: str, conn: psycopg.Connection) -> None:
    async def scenario() -> None:
        engine = async_engine(app_dsn)
        try:
            async with AsyncSession(engine) as session:
                await session.execute(text("INSERT INTO orders VALUES (1)"))
                await pulsed.enqueue_async(session, "ship", {"order": 1})
                await pulsed.enqueue_many_async(session, [{"type": "invoice"}])
                assert rows(conn) == ([], [])
                await session.commit()
                await session.execute(text("INSERT INTO orders VALUES (2)"))
                await pulsed.enqueue_async(session, "dropped")
                await session.rollback()
            async with engine.connect() as connection:  # enqueue first, as for sync
                await pulsed.enqueue_async(connection, "first")
                await connection.execute(text("INSERT INTO orders VALUES (3)"))
                await connection.commit()
                await pulsed.enqueue_many_async(connection, [{"type": "dropped"}])
                await connection.rollback()
            async with engine.begin() as connection:
                await pulsed.enqueue_async(connection, "begun")
            async with AsyncSession(engine) as session:
                with pytest.raises(TypeError, match="enqueue_async"):
                    pulsed.enqueue(session, "t")  # an async object on the sync call
        finally:
            await engine.dispose()

    asyncio.run(scenario())
    assert rows(conn) == ([1, 3], ["ship", "invoice", "first", "begun"])


def test_a_sync_session_on_the_async_call_is_named(engine: Any) -> None:
    with Session(engine) as session:
        with pytest.raises(TypeError, match="AsyncSession or AsyncConnection"):
            asyncio.run(pulsed.enqueue_async(session, "t"))


def test_begin_nested_rolled_back_drops_only_its_job(engine: Any, conn: psycopg.Connection
                                                     ) -> None:
    with Session(engine) as session:
        pulsed.enqueue(session, "outer")
        savepoint = session.begin_nested()
        pulsed.enqueue(session, "nested", idempotency_key="k")
        savepoint.rollback()
        with session.begin_nested():
            pulsed.enqueue_many(session, [{"type": "kept", "idempotency_key": "k"}])
        assert rows(conn) == ([], [])
        session.commit()
    assert rows(conn) == ([], ["outer", "kept"])
