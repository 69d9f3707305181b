"""`GET /jobs/{id}?wait=SECONDS` without holding a connection or a thread.

A long poll used to run pulsed.wait() on a handler thread with a pooled
connection for up to a minute: seven of them took the whole pool, and
/healthz, every read and the next long poll waited POOL_TIMEOUT_S and
answered 503, the health check saying the database was down.

Now the API child has one watcher on its event loop: an AsyncConnection
that LISTENs on pulse_done, opened at the first long poll and closed after
IDLE_CLOSE_S without one. A long poll takes a pooled connection twice, for
a moment each: to add its waiter row (so the statement that finishes the
job sends the NOTIFY, see waiting.py) with the job as it is, and at the
end to read the job and remove the row. In between it is a future on the
loop. Jobs that end without a NOTIFY (failed by the master or the reaper)
are found by one query a RECHECK_S for all the jobs waited on, not one
per waiter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from pulsed.db.store import Store
from pulsed.db.store_worker import jobs_ended_among
from pulsed.jobs import JobRecord
from pulsed.waiting import RECHECK_S

# runs a blocking function on a handler thread: (function, *args) -> awaitable result
Blocking = Callable[..., Awaitable[Any]]

log = logging.getLogger("pulsed.http")

IDLE_CLOSE_S = 30.0  # the watcher's connection is closed after this long unwatched
LISTEN_READY_S = 1.0  # a long poll waits at most this for the watcher's LISTEN
RETRY_S = 1.0  # after the watcher's connection failed


class JobEnds:
    """The API child's watcher of job ends, on its event loop (every method
    is called there)."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect  # () -> awaitable AsyncConnection
        self._waiting: dict[int, set[asyncio.Future[None]]] = {}
        self._polls = 0  # long polls between begin() and end(): the watcher stays
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._closed = False

    async def begin(self, timeout: float) -> None:
        """A long poll starts: the watcher runs until it ends (end()). Waits
        at most `timeout` until it listens, so a job that ends from now on
        wakes its waiter; without that a waiter learns of it at a recheck."""
        self._polls += 1
        self._start()
        try:
            await asyncio.wait_for(self._listening.wait(), timeout)
        except TimeoutError:
            pass

    def end(self) -> None:
        self._polls -= 1

    async def until_ended(self, job_id: int, timeout: float) -> bool:
        """Wait until the job may have ended (its NOTIFY, the recheck, or a
        reconnect of the watcher): True, look again. False: stop waiting,
        for `timeout` passed or the API stops."""
        if self._closed:
            return False
        self._start()
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job_id, set()).add(future)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return False
        finally:
            waiters = self._waiting.get(job_id)
            if waiters is not None:
                waiters.discard(future)
                if not waiters:
                    del self._waiting[job_id]
        return not self._closed

    def close(self) -> None:
        """The API stops: every waiter answers now, with the job as it is."""
        self._closed = True
        for job_id in list(self._waiting):
            self._wake(job_id)
        if self._task is not None:
            self._task.cancel()

    def _start(self) -> None:
        if self._task is None and not self._closed:
            self._listening.clear()
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def _idle(self) -> bool:
        return not self._waiting and not self._polls

    def _wake(self, job_id: int) -> None:
        for future in self._waiting.get(job_id, ()):
            if not future.done():
                future.set_result(None)

    async def _watch(self) -> None:
        me = asyncio.current_task()
        try:
            while not self._closed and self._task is me:
                try:
                    await self._listen_until_idle()
                except Exception as exc:  # noqa: BLE001 - the watcher must outlive any failure
                    self._listening.clear()
                    if isinstance(exc, (psycopg.Error, OSError)):
                        log.warning("api: the long polls' LISTEN connection failed (%s); "
                                    "reconnecting in %gs",
                                    str(exc).strip() or type(exc).__name__, RETRY_S)
                    else:
                        log.exception("api: the long polls' watcher failed; restarting it")
                    # no NOTIFY came meanwhile: let every waiter look once more
                    for job_id in list(self._waiting):
                        self._wake(job_id)
                    if self._idle():
                        return  # nobody to watch for: the next long poll starts it again
                    await asyncio.sleep(RETRY_S)
        finally:
            if self._task is me:
                self._task = None
                self._listening.clear()

    async def _listen_until_idle(self) -> None:
        """LISTEN, wake waiters by NOTIFY and by the recheck, until no long
        poll came for IDLE_CLOSE_S."""
        loop = asyncio.get_running_loop()
        aconn = await self._connect()
        async with aconn:
            await aconn.set_autocommit(True)
            await aconn.execute("LISTEN pulse_done")
            self._listening.set()
            idle_since = loop.time()
            while not self._closed:
                async for notify in aconn.notifies(timeout=RECHECK_S):
                    if notify.payload.isascii() and notify.payload.isdigit():
                        self._wake(int(notify.payload))
                if self._waiting:
                    for job_id in await jobs_ended_among(aconn, list(self._waiting)):
                        self._wake(job_id)
                if not self._idle():
                    idle_since = loop.time()
                elif loop.time() - idle_since > IDLE_CLOSE_S:
                    # From now on a long poll starts a new watcher (this one
                    # may still be closing its connection).
                    self._task = None
                    self._listening.clear()
                    return


async def wait_for_end(ends: JobEnds, run: Blocking, connect: Callable[[], Any], job_id: int,
                       wait_s: float) -> JobRecord | None:
    """The job once it is finished, or as it is after `wait_s` (0: now);
    None: there is no such job."""
    if wait_s <= 0:
        return await run(_read, connect, job_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    await ends.begin(min(wait_s, LISTEN_READY_S))
    try:
        waiter, record = await run(_begin, connect, job_id)
        if waiter is None:
            return None
        try:
            while record is not None and not record.state.is_finished:
                left = deadline - loop.time()
                if left <= 0:
                    break
                ended = await ends.until_ended(job_id, left)
                record = await run(_read, connect, job_id)  # woken, or as it is at the end
                if not ended:
                    break
            return record
        finally:
            await run(_end, connect, waiter)
    finally:
        ends.end()


def _begin(connect: Callable[[], Any], job_id: int) -> tuple[int | None, JobRecord | None]:
    """The waiter row (committed first: an end committed after the read
    below sends its NOTIFY), then the job."""
    with connect() as conn:
        store = Store(conn)
        waiter = store.waiter_add(job_id)
        return waiter, None if waiter is None else store.get_job(job_id)


def _read(connect: Callable[[], Any], job_id: int) -> JobRecord | None:
    with connect() as conn:
        return Store(conn).get_job(job_id)


def _end(connect: Callable[[], Any], waiter: int) -> None:
    """Remove the waiter row. If the database cannot be reached now, the row
    stays (the job's completion then sends a NOTIFY nobody needs) and goes
    with the job when it is pruned."""
    try:
        with connect() as conn:
            Store(conn).waiter_remove(waiter)
    except (psycopg.Error, OSError) as exc:
        log.warning("api: could not remove long poll waiter %d (%s); it goes with its job",
                    waiter, str(exc).strip() or type(exc).__name__)
