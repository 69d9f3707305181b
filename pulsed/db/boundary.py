"""The Store's error boundary: a lost or refused connection in a Store
method leaves as pulsed.errors.StoreUnavailable, carrying psycopg's error."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from pulsed.errors import StoreError, StoreUnavailable

T = TypeVar("T")


# SQLSTATEs of a connection the server ended or refused (class 08:
# connection exception; 57P01-57P03: admin or crash shutdown, cannot
# connect now). Other errors on a live connection are the statement's.
_CONNECTION_CLASS = "08"
_SHUTDOWN_STATES = frozenset({"57P01", "57P02", "57P03"})


def _lost_connection(exc: psycopg.Error, conn: psycopg.Connection) -> bool:
    if isinstance(exc, StoreError):
        return False  # raised by a nested Store call: already at the boundary
    state = exc.sqlstate or ""
    return (conn.closed or conn.broken or state.startswith(_CONNECTION_CLASS)
            or state in _SHUTDOWN_STATES)


def error_boundary(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if not _lost_connection(exc, self.conn):
                raise
            raise StoreUnavailable(f"Store.{method.__name__}", exc) from exc
    return guarded


def with_error_boundary(cls: type[T]) -> type[T]:
    """Every public method of `cls` (its own and inherited) behind
    error_boundary."""
    for name, value in inspect.getmembers(cls, inspect.isfunction):
        if not name.startswith("_"):
            setattr(cls, name, error_boundary(value))
    return cls
