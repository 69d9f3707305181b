"""Pulse's errors: one root class, one class per failure mode.

A class's docstring is its default message. The database boundary is
pulsed.db.store.Store: a lost or refused connection in any of its methods
leaves as StoreUnavailable (``raise StoreUnavailable(...) from exc``), so
callers catch StoreError without knowing psycopg's hierarchy.
"""

from __future__ import annotations

import psycopg

# Process exit codes (sysexits.h where one fits). Children use the CHILD_*
# codes to tell the master why they left, so it can back off instead of spin.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3  # pulsectl: the daemon did not answer
EXIT_CONFIG = 78  # EX_CONFIG
EXIT_DATABASE_UNREACHABLE = 69  # EX_UNAVAILABLE: pulsed gave up waiting for the database
EXIT_NODE_IN_USE = 73  # another live pulsed holds this daemon.node_id
CHILD_BOOT_ERROR = 70  # a child could not start: handler import, bad config
CHILD_RECYCLE = 71  # a worker left to be replaced (max_jobs / max_rss_mb)
CHILD_PARENT_GONE = 72  # a child noticed the master died and left


class PulseError(Exception):
    """A Pulse operation failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(PulseError):
    """The configuration is invalid."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"config key '{key}': {problem}")


class JobInputError(PulseError, ValueError):
    """A job argument is invalid; nothing was written."""

    def __init__(self, argument: str, problem: str) -> None:
        self.argument = argument
        self.problem = problem
        super().__init__(f"{argument}: {problem}")


class StoreError(PulseError):
    """A database operation failed."""


class StoreUnavailable(StoreError, psycopg.OperationalError):
    """The database connection was lost or refused during a Store call.

    Also a psycopg.OperationalError: code (and applications, whose own
    transaction a Store may run in) written against psycopg's errors keeps
    catching it. `cause` is the driver's error (also __cause__)."""

    def __init__(self, operation: str, cause: BaseException) -> None:
        self.operation = operation
        self.cause = cause
        first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        super().__init__(f"database unavailable during {operation}: {first_line}")


class MigrationError(StoreError):
    """The schema could not be migrated."""


class JobNotFound(PulseError):
    """No job has that id."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id}")


class HandlerNotFound(PulseError):
    """No handler is registered for this job type."""


class EmbeddedServerError(PulseError):
    """The embedded PostgreSQL server could not be started."""


class NoDatabase(PulseError):
    """No database: database.url is not set and no pulsed runs an embedded
    PostgreSQL in the state directory. Start it with `pulsed`."""


class NodeInUse(PulseError):
    """Another pulsed is running with this node id."""


class DatabaseUnreachable(StoreError):
    """pulsed could not reach its database at start."""
