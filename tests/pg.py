"""Helpers for tests that need PostgreSQL: databases by name, and waiting.

Tests wait on conditions, never on bare sleeps: ``wait_until`` polls and fails
with a message that says what never happened.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10,
    interval: float = 0.02,
    message: str | Callable[[], str] = "the condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Fails the test with ``message`` after ``timeout`` seconds; a callable
    message is called then (a daemon's log as it is at the failure, not as
    it was when the wait began).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            pytest.fail(f"timed out after {timeout:g}s waiting for {text}")
        time.sleep(interval)


def unique_name(prefix: str) -> str:
    """A database name no concurrent test session will pick (63-byte limit)."""
    return f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"


def with_dbname(dsn: str, dbname: str) -> str:
    """``dsn`` (URL or key=value) pointed at another database."""
    return make_conninfo(dsn, dbname=dbname)


def create_database(admin_dsn: str, name: str, template: str | None = None) -> str:
    """Create database ``name`` (copying ``template`` if given); return its DSN."""
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(query)
    return with_dbname(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop database ``name``, disconnecting anyone still using it."""
    query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(query)
