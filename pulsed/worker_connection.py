"""The worker's connection: one (autocommit) shared by its threads, where
its wake-ups and cancels arrive, and what happens when it is lost.

Behind a transaction pooler (WorkerOptions.pooler) nothing here relies on
session state on that connection: wake-ups and cancels come over a direct
connection to listen_url, or without one the worker polls.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import psycopg

from pulsed.db.connect import Backoff, connect
from pulsed.db.rows import use_fast_json
from pulsed.db.store import CLAIM_SESSION, Store
from pulsed.ledger import JobLedger
from pulsed.worker_options import DB_UNREACHABLE_AFTER_S, WAIT_SLICE_S, WAKEUPS, WorkerOptions, WorkerStatus

# The worker's records go to one logger, whichever module writes them
# (operators and tests filter on "pulsed.worker").
log = logging.getLogger("pulsed.worker")


class WorkerConnection:
    """Mixin of Worker: its connection(s), notifications and reconnects."""

    dsn: str
    options: WorkerOptions
    status: WorkerStatus
    ledger: JobLedger
    _conn: psycopg.Connection | None
    _store: Store | None
    _conn_lock: threading.RLock
    _listen_conn: psycopg.Connection | None
    _backoff: Backoff

    def _connection_lost(self, exc: Exception, should_stop: Callable[[], bool]) -> None:
        """Back off (capped, jittered) before reconnecting; never spin.
        Unwritten completions are kept and sent with the next claim: the
        lease fence drops any whose lease was reaped meanwhile."""
        log.warning("database connection lost (%s); reconnecting after a backoff", exc)
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
        elif now - self._unreachable_since >= DB_UNREACHABLE_AFTER_S:
            self._said_unreachable = True
            self.status.database_unreachable(
                f"no database for {now - self._unreachable_since:.0f}s: {_first_line(exc)}")
        self.close()
        self._backoff.wait(should_stop, slice_s=WAIT_SLICE_S)

    def _database_reached(self) -> None:
        self._unreachable_since = None
        if self._said_unreachable:
            self._said_unreachable = False
            self.status.database_reachable()

    def wait_for_jobs(self, timeout: float,
                      should_stop: Callable[[], bool] = lambda: False) -> None:
        """Sleep until a job is enqueued (NOTIFY), timeout passes or
        should_stop(); waits in short slices so a stop is seen quickly and
        the lease keeper gets the connection between them."""
        deadline = time.monotonic() + timeout
        with self._conn_lock:
            if not self._listening:
                # Jobs committed since the caller's last claim sent their NOTIFY
                # to nobody: listen, and let the caller claim again first.
                self._listen()
                return
            if self._take_wakeups():
                return  # jobs may have come since the claim that found none
        while not should_stop():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with self._conn_lock:
                if self._wakeup_heard:  # the lease keeper read it between two slices
                    self._wakeup_heard = False
                    return
                conn = self._notify_connection()
                if conn is not None:
                    for notify in conn.notifies(timeout=min(remaining, WAIT_SLICE_S),
                                                stop_after=1):
                        if self._route(notify):
                            return
            if conn is None:  # a pooler and no listen_url: poll
                time.sleep(min(remaining, WAIT_SLICE_S))

    def _listen(self) -> None:
        if self._pooled:
            self._notify_connection()  # listen_url's connection LISTENs from its start
        else:
            with self.db() as store:
                store.listen_for_wakeups()
        self._listening = True

    def _take_wakeups(self) -> int:
        """Discard the NOTIFYs that arrived while the worker was busy; how
        many there were. Without this, a worker that never idles keeps one
        per enqueue in memory, and when it does idle each one costs an
        empty claim (100,000 queued wake-ups: 100,000 claims in a row)."""
        with self._conn_lock:
            taken = int(self._wakeup_heard)
            self._wakeup_heard = False
            conn = self._notify_connection()
            if conn is not None:
                for notify in conn.notifies(timeout=0):
                    taken += self._route(notify)
        return taken

    def _route(self, notify: Any) -> bool:
        """A notification: True for a wake-up (jobs were enqueued); a
        cancellation is handed to the ledger."""
        if notify.channel == WAKEUPS:
            return True
        self._on_cancel(notify.payload)
        return False

    def _route_pending_notifies(self) -> None:
        """Hear cancellations that came while handlers run (the main thread
        may not read its connection for a long time). Only on an open
        connection: a keeper with nothing else to do never connects (with
        the database refusing connections it would try twice a second). A
        wake-up read here is not lost: the main thread's wait sees the flag."""
        with self._conn_lock:
            conn = self._listen_conn if self._pooled else self._conn
            if conn is None or conn.closed:
                self._poll_cancels()
                return
            for notify in conn.notifies(timeout=0):
                if self._route(notify):
                    self._wakeup_heard = True

    @contextmanager
    def db(self) -> Iterator[Store]:
        """The worker's connection, for one thread at a time: the main
        loop, job threads recording failures and the lease keeper share it
        (psycopg's own lock does not cover a whole pipeline)."""
        with self._conn_lock:
            conn = self.connection()
            if self._store is None or self._store.conn is not conn:
                self._store = Store(conn)  # one per connection: it keeps the claims' cursor
            yield self._store

    def connection(self) -> psycopg.Connection:
        with self._conn_lock:
            if self._conn is None or self._conn.closed:
                options = self.options
                self._conn = connect(self.dsn, "worker", instance=options.owner,
                                     settings=CLAIM_SESSION, pooler=options.pooler)
                use_fast_json(self._conn)  # every claimed job's payload
                self._listening = False
                if self._pooled:
                    # Each claim sets its plan settings in its own transaction.
                    self._claim_session = False
                else:
                    self._claim_session = self._has_claim_session(self._conn)
                    Store(self._conn).listen_for_cancels()
            return self._conn

    def _notify_connection(self) -> psycopg.Connection | None:
        """Where wake-ups and cancels arrive: the worker's connection, or
        behind a pooler the direct one to listen_url (LISTEN is session
        state: through PgBouncer in transaction mode it would be lost),
        or None there without a listen_url (the worker polls)."""
        if not self._pooled:
            return self.connection()
        if self.options.listen_url is None:
            return None
        with self._conn_lock:
            if self._listen_conn is None or self._listen_conn.closed:
                conn = connect(self.options.listen_url, "worker",
                               instance=f"{self.options.owner} listen")
                store = Store(conn)
                store.listen_for_wakeups()
                store.listen_for_cancels()
                self._listen_conn = conn
            return self._listen_conn

    def _poll_cancels(self) -> None:
        """Behind a pooler without listen_url no cancel NOTIFY comes: look
        for cancelled jobs among the running ones every poll_interval."""
        if not self._pooled or self.options.listen_url is not None:
            return
        now = time.monotonic()
        running = [job.id for job in self.ledger.running()]
        if not running or now - self._cancels_polled_at < self.options.poll_interval:
            return
        self._cancels_polled_at = now
        with self.db() as store:
            cancelled = store.cancelled_among(running)
        for job_id in cancelled:
            self._on_cancel(str(job_id))

    def _has_claim_session(self, conn: psycopg.Connection) -> bool:
        """Did the server apply CLAIM_SESSION? A pooler may drop startup
        options; then each claim sets its plan settings itself."""
        if conn.execute("SHOW enable_sort").fetchone()[0] == "off":
            return True
        log.warning("the connection's options were not applied (a pooler dropping them?); "
                    "each claim sets its plan settings itself")
        return False

    def store(self) -> Store:
        return Store(self.connection())

    def close(self) -> None:
        with self._conn_lock:
            for conn in (self._conn, self._listen_conn):
                if conn is not None:
                    conn.close()
            self._conn = self._listen_conn = None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _sleep_until(should_stop: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not should_stop() and time.monotonic() < deadline:
        time.sleep(min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic())))

