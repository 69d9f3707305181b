"""Enqueue on SQLAlchemy 2: the psycopg 3 connection under a Session or
Connection (sync, `postgresql+psycopg://`) or an AsyncSession or
AsyncConnection (`postgresql+psycopg_async://`), inside the transaction
SQLAlchemy has open on it.

pulsed.enqueue(session, ...) and the other enqueue functions call these;
an application never needs to. Imported only when such an object is
passed, so the core never imports SQLAlchemy.
"""

from __future__ import annotations

from typing import Any

import psycopg

# SQLAlchemy imported lazily below: pulsed.api imports this module only for
# SQLAlchemy objects, and importing sqlalchemy here too is then free.


def psycopg_connection(session_or_connection: Any) -> psycopg.Connection:
    """The psycopg Connection of a Session or Connection, its transaction begun."""
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session, scoped_session

    if isinstance(session_or_connection, scoped_session):
        session_or_connection = session_or_connection()  # this scope's Session
    if isinstance(session_or_connection, Session):
        # Joins the session's transaction (beginning it if none is open,
        # as any statement through the session would).
        connection = session_or_connection.connection()
    elif isinstance(session_or_connection, Connection):
        connection = session_or_connection
        if not connection.in_transaction():
            # What SQLAlchemy's autobegin does on a first statement: without
            # it, SQLAlchemy would not know of the transaction psycopg opens,
            # its commit() would do nothing and the pool's reset would roll
            # the job back.
            connection.begin()
    else:
        raise TypeError(_not_supported(session_or_connection, "Session or Connection"))
    return _driver_connection(connection.connection.driver_connection, psycopg.Connection,
                              "postgresql+psycopg://")


async def psycopg_connection_async(session_or_connection: Any) -> psycopg.AsyncConnection:
    """The psycopg AsyncConnection of an AsyncSession or AsyncConnection,
    its transaction begun."""
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session

    if isinstance(session_or_connection, async_scoped_session):
        session_or_connection = session_or_connection()
    if isinstance(session_or_connection, AsyncSession):
        connection = await session_or_connection.connection()
    elif isinstance(session_or_connection, AsyncConnection):
        connection = session_or_connection
        if not connection.in_transaction():
            await connection.begin()  # as for a sync Connection, above
    else:
        raise TypeError(_not_supported(session_or_connection, "AsyncSession or AsyncConnection"))
    raw = await connection.get_raw_connection()
    return _driver_connection(raw.driver_connection, psycopg.AsyncConnection,
                              "postgresql+psycopg_async://")


def _driver_connection(driver: Any, expected: type, url: str) -> Any:
    if not isinstance(driver, expected):
        raise TypeError(f"Pulse enqueues through psycopg 3: the SQLAlchemy engine must use "
                        f"a {url} URL, but its driver connection is a "
                        f"{type(driver).__module__}.{type(driver).__name__}")
    return driver


def _not_supported(obj: Any, supported: str) -> str:
    return (f"a SQLAlchemy {type(obj).__name__} cannot enqueue: pass a {supported} "
            f"(sync objects to pulsed.enqueue, async ones to pulsed.enqueue_async)")
