"""Group commit for `POST /jobs`: single-job requests that arrive together
are inserted in one transaction (one bulk statement), each answered with
its own job.

A commit waits for the WAL to reach the disk (fsync on); one transaction per
request made 32 concurrent clients wait on each other's flushes, ~600 jobs/s
here. A flusher thread takes every request waiting when it is free, so a
lone request goes alone and at once (no timer: nothing waits for company),
and under load a group is whatever arrived during the previous commit.

Correctness: a request gets its job only after its group's transaction
committed. A group the database refuses (a value it rejects, which the
checks let through) is retried one request per transaction, so only the
bad request fails. An idempotency key held, or given twice in one group,
gives the holder's job as sequential requests would (created False).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import select
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pulsed import metrics
from pulsed.db.store import Store
from pulsed.db.store_enqueue import Inserted
from pulsed.jobs import JobRecord, JobState

log = logging.getLogger("pulsed.http")

MAX_GROUP = 500  # requests in one transaction; the rest go in the next
HOLD_CONNECTION_S = 1.0  # an idle flusher keeps its connection this long


@dataclass(frozen=True)
class Enqueued:
    inserted: Inserted  # id, state, created
    record: JobRecord | None  # the job's row as committed (None: pruned meanwhile)


@dataclass
class _Pending:
    params: Mapping[str, Any]
    future: Future | asyncio.Future = field(default_factory=Future)
    loop: asyncio.AbstractEventLoop | None = None  # an asyncio future's: set it there


class EnqueueGroup:
    """A thread that inserts waiting single-job enqueues together; enqueue()
    blocks its caller (a handler thread) until its job is committed. One
    thread: commits that NOTIFY take a lock until they end, so a second
    could not overlap."""

    def __init__(self, connect: Callable[[], AbstractContextManager[Any]], *,
                 max_group: int = MAX_GROUP) -> None:
        self.connect, self.max_group = connect, max_group
        self._pending: list[_Pending] = []
        self._holding: list[_Pending] = []  # the group the flusher has taken (see _run)
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="pulse-api-enqueue", daemon=True)
        self._thread.start()

    def enqueue(self, params: Mapping[str, Any], timeout: float | None = None) -> Enqueued:
        """Insert one job (job_params' row), committed; raises what its
        transaction raised (psycopg errors included)."""
        pending = _Pending(params)
        self._add(pending)
        return pending.future.result(timeout)  # type: ignore[arg-type]

    def enqueue_async(self, params: Mapping[str, Any]) -> asyncio.Future:
        """enqueue() for the event loop: a future of the Enqueued. Its
        request needs no handler thread: the loop parses, checks and answers,
        this group inserts, and one call per group settles its futures."""
        loop = asyncio.get_running_loop()
        pending = _Pending(params, loop.create_future(), loop)
        self._add(pending)
        return pending.future  # type: ignore[return-value]

    def _add(self, pending: _Pending) -> None:
        with self._cond:
            if self._stopped:
                raise RuntimeError("the API is stopping")
            self._pending.append(pending)
            self._cond.notify()

    def stop(self) -> None:
        """Commit what is waiting, then end the threads."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()

    def _next_group(self, wait: float | None) -> list[_Pending] | None:
        """What is waiting (at most max_group), after waiting for it up to
        `wait` seconds (None: until there is some, or the group stops); None
        when nothing came."""
        with self._cond:
            if not self._pending and not self._stopped and wait != 0:
                self._cond.wait_for(lambda: self._pending or self._stopped, wait)
            if not self._pending:
                return None
            group = self._pending[:self.max_group]
            del self._pending[:self.max_group]
            return group

    def _run(self) -> None:
        group = self._next_group(wait=None)
        while group is not None:
            self._holding = group
            try:
                with self.connect() as conn:
                    conn.autocommit = True  # see _insert
                    try:
                        group = self._commit_while_coming(conn)
                    finally:
                        if not conn.closed:
                            conn.autocommit = False  # as the pool's other users expect
            except Exception as exc:  # noqa: BLE001 - no connection (or a bug): tell the
                _settle(self._holding, [], exc)  # group in hand, and go on with the next
                group = None
            if group is None:
                group = self._next_group(wait=None)

    def _commit_while_coming(self, conn: Any) -> list[_Pending] | None:
        """Commit groups on one connection while they keep coming, and for a
        moment after (the pool checks a connection it hands out: one more
        round trip, and under load the next group is often a fraction of a
        millisecond away). A group to commit on a new connection when this
        one was closed while it waited (the pool's check then drops it).
        self._holding is the group in hand, settled by _run if this raises."""
        while True:
            try:
                self._commit(conn, self._holding)
            except psycopg.OperationalError as exc:  # broken: the pool replaces it
                _settle(self._holding, [], exc)
                return None
            group = self._next_group(wait=0) or self._next_group(wait=HOLD_CONNECTION_S)
            if group is None:
                return None
            self._holding = group
            if _hung_up(conn):
                return group

    def _commit(self, conn: Any, group: list[_Pending]) -> None:
        try:
            enqueued = self._insert(conn, [pending.params for pending in group])
        except psycopg.OperationalError:
            raise  # the connection is broken: _run tells the group, the pool replaces it
        except psycopg.Error as exc:
            if len(group) == 1:
                _settle(group, [], exc)
                return
            # one request's value refused: find it by committing each alone
            log.info("api: a group of %d enqueues was refused (%s); retrying one by one",
                     len(group), str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            for pending in group:
                self._commit(conn, [pending])
        except Exception as exc:  # noqa: BLE001 - a bug: each caller reports it
            _settle(group, [], exc)
        else:
            _count_created(group, enqueued)
            _settle(group, enqueued, None)

    def _insert(self, conn: Any, batch: list[Mapping[str, Any]]) -> list[Enqueued]:
        store = Store(conn)
        if any(params["idempotency_key"] is not None for params in batch):
            # a held key takes more statements (look the holder up, release
            # an expired hold): one transaction, and the holders' rows
            with conn.transaction():
                inserted = store.inserted_jobs(batch, answer=True)
                held = store.get_jobs(sorted({i.id for i in inserted if i.columns is None}))
        else:
            # one statement, in autocommit its own transaction: BEGIN and
            # COMMIT were two of a group's four round trips, and the new
            # rows' columns come back with it (no second read)
            inserted = store.inserted_jobs(batch, answer=True)
            held = {}
        # committed (execute returns after the commit): only now may anyone
        # be told their job exists
        return [Enqueued(item, held.get(item.id) if item.columns is None
                         else _new_record(params, item))
                for params, item in zip(batch, inserted)]


def _count_created(group: list[_Pending], enqueued: list[Enqueued]) -> None:
    """pulse_jobs_enqueued_total: one increment per type per group (a
    multiprocess counter's increment takes a lock and a write to its file)."""
    by_type = collections.Counter(pending.params["type"]
                                  for pending, item in zip(group, enqueued) if item.inserted.created)
    for job_type, count in by_type.items():
        metrics.jobs_enqueued(job_type, "http", count)


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


def _settle(group: list[_Pending], results: list[Enqueued], exc: BaseException | None) -> None:
    """Give each pending its result (or `exc`); asyncio futures in one call
    per event loop, on that loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any]]] = {}
    for n, pending in enumerate(group):
        outcome = exc if exc is not None else results[n]
        if pending.loop is None:
            if pending.future.done():  # settled before a broken connection ended its group
                continue
            if exc is not None:
                pending.future.set_exception(exc)
            else:
                pending.future.set_result(outcome)
        else:
            by_loop.setdefault(pending.loop, []).append((pending.future, outcome))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_on_loop, items)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle_on_loop(items: list[tuple[asyncio.Future, Any]]) -> None:
    for future, outcome in items:
        if future.done():  # cancelled: the connection went away
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
