"""The application's side of Pulse: enqueue jobs, register handlers.

    import pulsed

    @pulsed.handler("email", max_attempts=5, timeout=30)
    def send_email(job):
        ...

    with psycopg.connect(dsn) as conn:          # the application's transaction
        job_id = pulsed.enqueue(conn, "email", {"to": "a@example.com"})

    async with await psycopg.AsyncConnection.connect(dsn) as aconn:
        job_id = await pulsed.enqueue_async(aconn, "email", {"to": "a@example.com"})

Every argument is checked before anything is written; a bad one raises
JobInputError naming it.
"""

from __future__ import annotations

import builtins
import inspect

from dataclasses import dataclass
from datetime import datetime
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psycopg

from pulsed.db.store import (Store, insert_job_steps, insert_jobs_steps, run_steps,
                             run_steps_async)
from pulsed.errors import HandlerNotFound, JobInputError, PulseError
from pulsed.jobs import DEFAULT_MAX_ATTEMPTS, Job  # noqa: F401 (DEFAULT_MAX_ATTEMPTS: re-exported)
# The input checks live in pulsed/job_input.py; their names stay importable here.
from pulsed.job_input import (  # noqa: F401 (re-exported)
    DEFAULT_PRIORITY, DEFAULT_QUEUE, INT_MAX, MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES, MAX_SECONDS,
    MAX_TEXT_LENGTH,
    RUN_AT_MAX, RUN_AT_MIN, SMALLINT_MAX, SMALLINT_MIN, TIMEOUT_MAX_S, TIMEOUT_MIN_S,
    UNIQUE_WHILE, UNIQUE_WHILE_UNFINISHED, _check_int, _check_seconds, check_text,
    _check_timeout, job_params)



class Fail(PulseError):
    """Raised by a handler: fail the job now, without retrying."""


class Snooze(PulseError):
    """Raised by a handler: run the job again after `seconds`, without
    using up an attempt."""

    def __init__(self, seconds: float) -> None:
        # At most 100 years, as an enqueue's delay: past it the job's run_at
        # left PostgreSQL's range, and the snooze's write crashed the worker.
        # The float kept is checked: a subclass's __float__ may say otherwise.
        _check_seconds("seconds", seconds, allow_zero=True)
        value = float(seconds)
        _check_seconds("seconds", value, allow_zero=True)
        self.seconds = value
        super().__init__(f"snoozed for {self.seconds:g}s")


# -- handlers -----------------------------------------------------------------


@dataclass(frozen=True)
class Handler:
    type: str
    func: Callable[[Job], Any]
    max_attempts: int | None = None
    timeout: float | None = None
    # An `async def` handler (or a callable whose __call__ is one): the
    # worker awaits it on its event loop. Set once here, read per job.
    is_async: bool = False


def _is_coroutine_function(func: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None))


class HandlerRegistry:
    """Job type -> handler. Workers import the configured modules, whose
    `@pulsed.handler` decorators fill the default registry."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, job_type: str, func: Callable[[Job], Any], *,
                 max_attempts: int | None = None, timeout: float | None = None) -> None:
        check_text("type", job_type)
        if max_attempts is not None:
            _check_int("max_attempts", max_attempts, 1, INT_MAX)
        if timeout is not None:
            _check_timeout(timeout)
        self._handlers[job_type] = Handler(job_type, func, max_attempts, timeout,
                                           _is_coroutine_function(func))

    def get(self, job_type: str) -> Handler:
        try:
            return self._handlers[job_type]
        except KeyError:
            raise HandlerNotFound(f"no handler registered for job type '{job_type}'") from None

    def max_attempts(self) -> dict[str, int]:
        """The handlers' own max_attempts, by type."""
        return {t: h.max_attempts for t, h in self._handlers.items() if h.max_attempts}

    def types(self) -> list[str]:
        return sorted(self._handlers)

    def __contains__(self, job_type: str) -> bool:
        return job_type in self._handlers


handlers = HandlerRegistry()


def handler(job_type: str, *, max_attempts: int | None = None, timeout: float | None = None,
            registry: HandlerRegistry | None = None) -> Callable[[Callable], Callable]:
    """Register the decorated function as the handler of `job_type`."""

    def decorate(func: Callable[[Job], Any]) -> Callable[[Job], Any]:
        (registry or handlers).register(job_type, func, max_attempts=max_attempts,
                                        timeout=timeout)
        return func

    return decorate


# -- enqueue ------------------------------------------------------------------


def enqueue(conn: Any, type: str, payload: Mapping[str, Any] | None = None, *,
            priority: int = DEFAULT_PRIORITY, run_at: datetime | None = None,
            delay: float | None = None, max_attempts: int | None = None,
            idempotency_key: str | None = None, queue: str = DEFAULT_QUEUE,
            timeout: float | None = None, unique_while: str | None = None,
            unique_for: float | None = None) -> int:
    """Add a job inside the caller's transaction and return its id.

    `conn`: a psycopg Connection, or a SQLAlchemy 2 Session or Connection
    on psycopg 3 (`postgresql+psycopg://`), whose transaction it joins.
    The job exists only if that transaction commits. With an
    `idempotency_key` already held by a job, the holder's id is returned and
    nothing is added. How long the new job holds its key: until it is
    pruned past its retention (the default); with
    unique_while="unfinished", until it completes, fails or is cancelled;
    with unique_for=SECONDS, for that long from now.
    """
    row = job_params(type=type, payload=payload, priority=priority, run_at=run_at,
                     delay=delay, max_attempts=max_attempts,
                     idempotency_key=idempotency_key, queue=queue, timeout=timeout,
                     unique_while=unique_while, unique_for=unique_for)
    job_id, _created = run_steps(_sync_connection(conn), insert_job_steps(row))
    return job_id


async def enqueue_async(aconn: Any, type: str, payload: Mapping[str, Any] | None = None, *,
                        priority: int = DEFAULT_PRIORITY, run_at: datetime | None = None,
                        delay: float | None = None, max_attempts: int | None = None,
                        idempotency_key: str | None = None, queue: str = DEFAULT_QUEUE,
                        timeout: float | None = None, unique_while: str | None = None,
                        unique_for: float | None = None) -> int:
    """enqueue() on a psycopg AsyncConnection, or a SQLAlchemy AsyncSession
    or AsyncConnection on `postgresql+psycopg_async://`: the same checks,
    errors and statements, in the caller's transaction."""
    row = job_params(type=type, payload=payload, priority=priority, run_at=run_at,
                     delay=delay, max_attempts=max_attempts,
                     idempotency_key=idempotency_key, queue=queue, timeout=timeout,
                     unique_while=unique_while, unique_for=unique_for)
    job_id, _created = await run_steps_async(await _async_connection(aconn),
                                             insert_job_steps(row))
    return job_id


def enqueue_many(conn: Any, jobs: Iterable[Mapping[str, Any]]) -> list[int]:
    """Add many jobs in one statement; return their ids in input order.

    Each item is a dict with enqueue()'s keywords (`type` required). All are
    validated before any is written. `conn` as for enqueue().
    """
    batch = _checked_batch(jobs)
    if not batch:
        return []
    return run_steps(_sync_connection(conn), insert_jobs_steps(batch))


async def enqueue_many_async(aconn: Any, jobs: Iterable[Mapping[str, Any]]) -> list[int]:
    """enqueue_many() on an async connection (as for enqueue_async())."""
    batch = _checked_batch(jobs)
    if not batch:
        return []
    return await run_steps_async(await _async_connection(aconn), insert_jobs_steps(batch))


# enqueue_many's keys: job_params()'s keywords
JOB_KEYS = frozenset(inspect.signature(job_params).parameters)


def _checked_batch(jobs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """enqueue_many's items as rows, every one checked before any is written."""
    if isinstance(jobs, (Mapping, str, bytes)):  # iterating it would check its keys or letters
        raise JobInputError("jobs", f"must be a list of dicts, one per job, got "
                                    f"{type(jobs).__name__} (one job: enqueue())")
    batch = []
    for index, spec in enumerate(jobs):
        if not isinstance(spec, Mapping):
            raise JobInputError(f"jobs[{index}]", f"must be a dict, got {type(spec).__name__}")
        unknown = sorted(set(spec) - JOB_KEYS, key=str)
        if unknown:
            raise JobInputError(f"jobs[{index}]", f"unknown key {unknown[0]!r}; the keys are "
                                                  f"enqueue()'s: {', '.join(sorted(JOB_KEYS))}")
        if "type" not in spec:
            raise JobInputError(f"jobs[{index}].type", "is required")
        try:
            batch.append(job_params(**spec))
        except TypeError as exc:  # a key equal to a keyword but not a str, say
            raise JobInputError(f"jobs[{index}]", str(exc)) from None
        except JobInputError as exc:
            raise JobInputError(f"jobs[{index}].{exc.argument}", exc.problem) from None
    return batch


def _sync_connection(conn: Any) -> psycopg.Connection:
    """The psycopg connection to enqueue on, in the caller's transaction."""
    if isinstance(conn, psycopg.Connection):
        return conn
    if _is_sqlalchemy(conn):
        from pulsed.contrib.sqlalchemy import psycopg_connection  # only when SQLAlchemy is used
        return psycopg_connection(conn)
    if isinstance(conn, psycopg.AsyncConnection):
        raise TypeError("conn is a psycopg AsyncConnection: use "
                        "`await pulsed.enqueue_async(...)` (or enqueue_many_async)")
    raise TypeError(f"conn must be a psycopg 3 Connection or a SQLAlchemy Session or "
                    f"Connection, got {_class_name(conn)}")


async def _async_connection(aconn: Any) -> psycopg.AsyncConnection:
    """_sync_connection for enqueue_async and enqueue_many_async."""
    if isinstance(aconn, psycopg.AsyncConnection):
        return aconn
    if _is_sqlalchemy(aconn):
        from pulsed.contrib.sqlalchemy import psycopg_connection_async
        return await psycopg_connection_async(aconn)
    if isinstance(aconn, psycopg.Connection):
        raise TypeError("aconn is a sync psycopg Connection: use pulsed.enqueue(...) "
                        "(or enqueue_many), or an AsyncConnection")
    raise TypeError(f"aconn must be a psycopg 3 AsyncConnection or a SQLAlchemy AsyncSession "
                    f"or AsyncConnection, got {_class_name(aconn)}")


def _class_name(obj: Any) -> str:
    """The class of what was passed, with its module: a psycopg2
    `connection` or an asyncpg `Connection` named bare read as the very
    thing the message asks for."""
    cls = builtins.type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _is_sqlalchemy(conn: Any) -> bool:
    """A SQLAlchemy object (or an application's subclass of one), told by
    its classes' modules: SQLAlchemy is imported only by applications that
    use it."""
    return any(cls.__module__.startswith("sqlalchemy.") for cls in builtins.type(conn).__mro__)


def cancel(conn: psycopg.Connection, job_id: int) -> bool:
    """Cancel a job that has not finished; False if it had (or none has
    that id). A running job's handler sees `job.cancelled` turn true within
    about a second and is stopped worker.cancel_grace seconds later; its
    attempt is recorded `cancelled`."""
    return Store(conn).cancel(job_id)
