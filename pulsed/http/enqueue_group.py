"""Group commit for `POST /jobs`: single-job requests that arrive together
are inserted in one transaction (one bulk statement), each answered with
its own job.

A commit waits for the WAL to reach the disk (fsync on); one transaction per
request made 32 concurrent clients wait on each other's flushes, ~600 jobs/s
here. The group takes every request waiting when it is free, so a lone
request goes alone and at once (no timer: nothing waits for company), and
under load a group is whatever arrived during the previous commit.

It runs on the API's event loop, on an AsyncConnection of its own: the
requests are parsed and answered on that loop, so a group is one more fd in
its select, not a thread. A flusher thread had to win the interpreter lock
back from the busy loop after each of its round trips (each wait up to the
switch interval), and every group crossed threads twice; on the loop, 32
clients got ~25% more jobs/s for ~20% less of the API child's CPU (W7).

Correctness: a request gets its job only after its group's transaction
committed. A group the database refuses (a value it rejects, which the
checks let through) is retried one request per transaction, so only the
bad request fails. An idempotency key held, or given twice in one group,
gives the holder's job as sequential requests would (created False); such
a group takes several statements in one transaction, on the same
connection (not on a handler thread: those may all be waiting on this
group, each with a large single job, which deadlocked the API).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import select
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import psycopg

from pulsed import metrics
from pulsed.db.store_enqueue import (Inserted, answered_jobs_steps, inserted_jobs_steps,
                                     run_steps_async)
from pulsed.http.messages import HttpError
from pulsed.jobs import JobRecord, JobState

log = logging.getLogger("pulsed.http")

MAX_GROUP = 500  # requests in one transaction; the rest go in the next
# A handler thread waiting for its job looks this often whether the loop
# stopped under it (its answer would never come).
STOPPED_CHECK_S = 1.0


@dataclass(frozen=True)
class Enqueued:
    inserted: Inserted  # id, state, created
    record: JobRecord | None  # the job's row as committed (None: pruned meanwhile)


@dataclass
class _Pending:
    params: Mapping[str, Any]
    future: asyncio.Future


class EnqueueGroup:
    """Inserts waiting single-job enqueues together, on `loop`: one task,
    one group at a time (commits that NOTIFY take a lock until they end, so
    a second could not overlap). enqueue_async() on the loop; enqueue()
    from any other thread (a handler thread) blocks until its job is
    committed."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 connect: Callable[[], Awaitable[psycopg.AsyncConnection]], *,
                 max_group: int = MAX_GROUP) -> None:
        self.loop = loop
        # its own connection, in autocommit, kept between groups (a pool's
        # check on hand-out was one more round trip per group)
        self.connect = connect
        self.max_group = max_group
        self._pending: list[_Pending] = []
        self._conn: psycopg.AsyncConnection | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stopped = False

    def enqueue(self, params: Mapping[str, Any], timeout: float | None = None) -> Enqueued:
        """Insert one job (job_params' row), committed; raises what its
        transaction raised (psycopg errors included). Not on the loop."""
        if self._stopped or self.loop.is_closed():
            raise _stopping()
        future: Future = Future()

        def hand_over() -> None:  # on the loop
            if not future.set_running_or_notify_cancel():
                return  # its waiter gave up: the loop had stopped
            try:
                self.enqueue_async(params).add_done_callback(
                    lambda done: _copy_outcome(done, future))
            except Exception as exc:  # noqa: BLE001 - stopping: the caller's to raise
                _set_outcome(future, exc)

        try:
            self.loop.call_soon_threadsafe(hand_over)
        except RuntimeError:  # closed meanwhile
            raise _stopping() from None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = STOPPED_CHECK_S if deadline is None else min(
                STOPPED_CHECK_S, max(0.0, deadline - time.monotonic()))
            try:
                return future.result(wait)
            except FutureTimeout:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if self.loop.is_running():
                    continue
                if future.cancel():
                    # the loop stopped after the check above: nothing will
                    # run the hand-over, and nothing was committed
                    raise _stopping() from None
                if self.loop.is_closed():
                    # handed over, then the stop ended the group mid-commit
                    # (past ENQUEUER_CLOSE_S): no answer will come
                    raise HttpError(503, "unavailable", "the API stopped before this job's "
                                    "commit was confirmed; it may exist: look it up, or send "
                                    "it again with an idempotency_key") from None

    def enqueue_async(self, params: Mapping[str, Any]) -> asyncio.Future:
        """enqueue() on the loop: a future of the Enqueued. Its request needs
        no handler thread: the loop parses, checks, inserts and answers."""
        if self._stopped:
            raise _stopping()
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = self.loop.create_task(self._run(), name="pulse-api-enqueue")
        assert self._wake is not None
        future = self.loop.create_future()
        self._pending.append(_Pending(params, future))
        self._wake.set()
        return future

    async def close(self) -> None:
        """Commit what is waiting (a request whose client left too: it may
        have been sent), then close the connection. On the loop."""
        self._stopped = True
        if self._task is not None:
            assert self._wake is not None
            self._wake.set()
            await self._task
        await self._drop_connection()

    def running(self) -> bool:
        """The group's task is alive (or not started yet: nothing came)."""
        return self._task is None or not self._task.done()

    async def _run(self) -> None:
        assert self._wake is not None
        while self._pending or not self._stopped:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            group = self._pending[:self.max_group]
            del self._pending[:self.max_group]
            try:
                await self._commit(group)
            except Exception as exc:  # noqa: BLE001 - a bug: the group goes on with the next
                log.exception("api: an enqueue group failed")
                _settle(group, [], exc)  # those not answered yet

    async def _commit(self, group: list[_Pending]) -> None:
        try:
            enqueued = await self._insert([pending.params for pending in group])
        except psycopg.OperationalError as exc:  # no connection, or a broken one
            _settle(group, [], exc)
        except psycopg.Error as exc:
            if len(group) == 1:
                _settle(group, [], exc)
                return
            # one request's value refused: find it by committing each alone
            log.info("api: a group of %d enqueues was refused (%s); retrying one by one",
                     len(group), str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            await self._commit_each(group)
        except Exception as exc:  # noqa: BLE001 - a bug: each caller reports it
            log.exception("api: an enqueue group failed")
            _settle(group, [], exc)
        else:
            _settle(group, enqueued, None)
            _count_created(group, enqueued)

    async def _commit_each(self, group: list[_Pending]) -> None:
        """Each request of a refused group alone. A lost connection ends it:
        the rest get that error at once, not a connect attempt each
        (connect_timeout apiece with the database gone). Other operational
        errors (a statement timeout, a deadlock) are that request's own."""
        for n, pending in enumerate(group):
            try:
                enqueued = await self._insert([pending.params])
            except psycopg.OperationalError as exc:
                if self._conn is None:  # lost, or never connected
                    _settle(group[n:], [], exc)
                    return
                _settle([pending], [], exc)
            except psycopg.Error as exc:
                _settle([pending], [], exc)
            except Exception as exc:  # noqa: BLE001 - a bug: this caller reports it
                log.exception("api: an enqueue failed")
                _settle([pending], [], exc)
            else:
                _settle([pending], enqueued, None)
                _count_created([pending], enqueued)

    async def _insert(self, batch: list[Mapping[str, Any]]) -> list[Enqueued]:
        conn = await self._connection()
        try:
            if any(params["idempotency_key"] is not None for params in batch):
                # a held key takes more statements (look the holder up,
                # release an expired hold): one transaction, and the
                # holders' rows
                async with conn.transaction():
                    inserted, held = await run_steps_async(conn, answered_jobs_steps(batch))
            else:
                # one statement, in autocommit its own transaction: BEGIN
                # and COMMIT were two of a group's four round trips, and the
                # new rows' columns come back with it (no second read)
                inserted = await run_steps_async(conn, inserted_jobs_steps(batch, answer=True))
                held = {}
        except psycopg.Error:
            if conn.closed or conn.broken:
                await self._drop_connection()
            raise
        except BaseException:  # cancelled, or a bug, mid-statement: its state is unknown
            await self._drop_connection()
            raise
        # committed (execute returns after the commit): only now may anyone
        # be told their job exists
        return [Enqueued(item, held.get(item.id) if item.columns is None
                         else _new_record(params, item))
                for params, item in zip(batch, inserted)]

    async def _connection(self) -> psycopg.AsyncConnection:
        """The group's connection; a new one when the server closed the one
        held while it was idle (a restart, idle_session_timeout, a
        terminated backend): the group goes on it instead of failing."""
        conn = self._conn
        if conn is not None and (conn.closed or conn.broken or _hung_up(conn)):
            await self._drop_connection()
            conn = None
        if conn is None:
            conn = self._conn = await self.connect()
        return conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass


def _count_created(group: list[_Pending], enqueued: list[Enqueued]) -> None:
    """pulse_jobs_enqueued_total: one increment per type per group (a
    multiprocess counter's increment takes a lock and a write to its file).
    After the answers: the jobs are committed, a metrics file that cannot
    be written must not tell their clients otherwise."""
    by_type = collections.Counter(pending.params["type"]
                                  for pending, item in zip(group, enqueued) if item.inserted.created)
    try:
        for job_type, count in by_type.items():
            metrics.jobs_enqueued(job_type, "http", count)
    except Exception:  # noqa: BLE001 - a count lost, logged; the group goes on
        log.exception("api: could not count %d enqueued jobs", sum(by_type.values()))


def _stopping() -> HttpError:
    return HttpError(503, "unavailable", "the API is stopping; try again")


def _hung_up(conn: Any) -> bool:
    """The server closed an idle connection, or said something on it (an
    idle connection that LISTENs to nothing gets only a termination notice).
    poll, not select: select() refuses descriptors past 1023, which an
    application embedding the API with many files open has."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _new_record(params: Mapping[str, Any], item: Inserted) -> JobRecord:
    """The row just inserted, from what was sent and what the database set."""
    assert item.columns is not None
    columns = item.columns
    return JobRecord(
        id=item.id, type=params["type"], queue=params["queue"], state=JobState(item.state),
        priority=columns["priority"], attempt=0, max_attempts=columns["max_attempts"],
        payload=json.loads(params["payload"]), run_at=columns["run_at"],
        created_at=columns["created_at"], started_at=None, finished_at=None,
        idempotency_key=params["idempotency_key"], last_error=None, lease_owner=None,
        unique_while=params["unique_while"], unique_until=columns["unique_until"])


def _copy_outcome(done: asyncio.Future, to: Future) -> None:
    if done.cancelled():
        _set_outcome(to, _stopping())
    else:
        exc = done.exception()
        _set_outcome(to, exc if exc is not None else done.result())


def _set_outcome(future: Future, outcome: Any) -> None:
    """Settle a blocking caller's future, unless it gave up meanwhile."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:  # cancelled by its waiter (the loop had stopped)
        pass


def _settle(group: list[_Pending], results: list[Enqueued], exc: BaseException | None) -> None:
    """Give each pending its result (or `exc`); a future whose request went
    away (cancelled) is left as it is."""
    for n, pending in enumerate(group):
        if pending.future.done():
            continue
        if exc is not None:
            pending.future.set_exception(exc)
        else:
            pending.future.set_result(results[n])
