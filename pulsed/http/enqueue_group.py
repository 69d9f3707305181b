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

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pulsed.db.store import Store
from pulsed.db.store_enqueue import Inserted
from pulsed.jobs import JobRecord

log = logging.getLogger("pulsed.http")

MAX_GROUP = 500  # requests in one transaction; the rest go in the next
FLUSHERS = 2  # transactions at once: one collects while the other commits


@dataclass(frozen=True)
class Enqueued:
    inserted: Inserted  # id, state, created
    record: JobRecord | None  # the job's row as committed (None: pruned meanwhile)


@dataclass
class _Pending:
    params: Mapping[str, Any]
    future: Future = field(default_factory=Future)


class EnqueueGroup:
    """Threads that insert waiting single-job enqueues together; enqueue()
    blocks its caller (a handler thread) until its job is committed."""

    def __init__(self, connect: Callable[[], AbstractContextManager[Any]], *,
                 flushers: int = FLUSHERS, max_group: int = MAX_GROUP) -> None:
        self.connect, self.max_group = connect, max_group
        self._pending: list[_Pending] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._threads = [threading.Thread(target=self._run, name=f"pulse-api-enqueue-{n}",
                                          daemon=True) for n in range(flushers)]
        for thread in self._threads:
            thread.start()

    def enqueue(self, params: Mapping[str, Any], timeout: float | None = None) -> Enqueued:
        """Insert one job (job_params' row), committed; raises what its
        transaction raised (psycopg errors included)."""
        pending = _Pending(params)
        with self._cond:
            if self._stopped:
                raise RuntimeError("the API is stopping")
            self._pending.append(pending)
            self._cond.notify()
        return pending.future.result(timeout)

    def stop(self) -> None:
        """Commit what is waiting, then end the threads."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if not self._pending:
                    return
                group = self._pending[:self.max_group]
                del self._pending[:self.max_group]
            self._commit(group)

    def _commit(self, group: list[_Pending]) -> None:
        try:
            enqueued = self._insert([pending.params for pending in group])
        except psycopg.OperationalError as exc:  # the database is gone: everyone's answer
            _fail(group, exc)
        except psycopg.Error as exc:
            if len(group) == 1:
                _fail(group, exc)
                return
            # one request's value refused: find it by committing each alone
            log.info("api: a group of %d enqueues was refused (%s); retrying one by one",
                     len(group), str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            for pending in group:
                self._commit([pending])
        except BaseException as exc:  # noqa: BLE001 - a bug: each caller reports it
            _fail(group, exc)
        else:
            for pending, done in zip(group, enqueued):
                pending.future.set_result(done)

    def _insert(self, batch: list[Mapping[str, Any]]) -> list[Enqueued]:
        with self.connect() as conn:
            with conn.transaction():
                store = Store(conn)
                inserted = store.inserted_jobs(batch)
                records = store.get_jobs(sorted({item.id for item in inserted}))
        # committed: only now may anyone be told their job exists
        return [Enqueued(item, records.get(item.id)) for item in inserted]


def _fail(group: list[_Pending], exc: BaseException) -> None:
    for pending in group:
        pending.future.set_exception(exc)
