"""LeaseKeeper: the leases a worker holds, kept honest from a thread.

A worker claims a batch and runs it job by job. While its main thread is
inside a handler, this thread (with its own connection, opened only when
needed) renews leases before they can expire, and gives back the
prefetched jobs held up for over a second (behind a long-running job, or
behind many slower than the batch was sized for), so they run elsewhere
instead of waiting. Each tick it also calls `on_tick`
(the worker writes the outcomes of jobs that ended before a long one).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import psycopg

from pulsed.db.store import Store
from pulsed.jobs import Job

log = logging.getLogger(__name__)

# Prefetched jobs wait in a worker at most this long (plus a tick) before
# they go back to the queue to run elsewhere.
GIVE_BACK_AFTER_S = 1.0
KEEPER_TICK_S = 0.5


class LeaseKeeper:
    def __init__(self, dsn: str, lease_ttl: float, *,
                 give_back_after: float = GIVE_BACK_AFTER_S) -> None:
        self.dsn = dsn
        self.lease_ttl = lease_ttl
        self.give_back_after = give_back_after
        self._leased_at: dict[int, tuple[Job, float]] = {}
        self._unstarted: dict[int, Job] = {}
        self._running: tuple[Job, float] | None = None
        self._held_since = 0.0  # when the oldest unstarted job was claimed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection | None = None
        # Called on this thread every tick with a way to get its connection.
        self.on_tick: Callable[[Callable[[], psycopg.Connection]], None] | None = None

    # -- the main thread's side -------------------------------------------------

    def hold(self, jobs: list[Job]) -> None:
        """A batch was claimed: all leased now, none started."""
        now = time.monotonic()
        with self._lock:
            if not self._unstarted:
                self._held_since = now
            for job in jobs:
                self._leased_at[job.id] = (job, now)
                self._unstarted[job.id] = job

    def begin(self, job: Job) -> bool:
        """The main thread is about to run job; False if it was given back."""
        with self._lock:
            if self._unstarted.pop(job.id, None) is None:
                return False
            self._running = (job, time.monotonic())
            return True

    def end(self, job: Job, *, written: bool) -> None:
        """job's handler returned. Its lease is kept (and renewed) until its
        outcome is written: a completion waits for the next claim."""
        with self._lock:
            self._running = None
            if written:
                self._leased_at.pop(job.id, None)

    def written(self, jobs: list[Job]) -> None:
        """These jobs' completions are in the database: stop renewing."""
        with self._lock:
            for job in jobs:
                self._leased_at.pop(job.id, None)

    def take_unstarted(self) -> list[Job]:
        """The main thread stops early: the jobs it will not run."""
        with self._lock:
            jobs = list(self._unstarted.values())
            self._unstarted.clear()
            for job in jobs:
                self._leased_at.pop(job.id, None)
            return jobs

    # -- the thread -------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pulse-lease-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run(self) -> None:
        while not self._stop.wait(min(KEEPER_TICK_S, self.lease_ttl / 3)):
            try:
                self.give_back_held_up()
                self.renew_due()
                if self.on_tick is not None:
                    self.on_tick(self._connection)
            except psycopg.Error as exc:
                log.warning("lease keeper: database error (will retry): %s", exc)
                if self._conn is not None:
                    self._conn.close()
                self._conn = None

    def give_back_held_up(self) -> list[Job]:
        """Return the unstarted rest of the batch to the queue once it has
        been held longer than give_back_after: behind one job that runs
        long, or behind many that each took longer than the batch was sized
        for (a batch is sized from the jobs seen so far, up to prefetch)."""
        with self._lock:
            running = self._running
            if not self._unstarted or time.monotonic() - self._held_since < self.give_back_after:
                return []
        jobs = self.take_unstarted()
        if jobs:
            given = Store(self._connection()).give_back(jobs)
            if given:
                Store(self._connection()).notify(sorted({r["queue"] for r in given}))
                behind = f"job {running[0].type}#{running[0].id}" if running else "the batch"
                log.info("gave back %d prefetched job(s) held for over %.1fs behind %s",
                         len(given), self.give_back_after, behind)
        return jobs

    def renew_due(self) -> None:
        """Renew every held lease taken more than a third of the TTL ago."""
        cutoff = time.monotonic() - self.lease_ttl / 3
        with self._lock:
            due = [job for job, since in self._leased_at.values() if since <= cutoff]
        if not due:
            return
        held = Store(self._connection()).renew_leases(due, self.lease_ttl)
        now = time.monotonic()
        with self._lock:
            for job in due:
                if job.id not in self._leased_at:
                    continue
                if job.id in held:
                    self._leased_at[job.id] = (job, now)
                else:  # lost for good: say so once, stop renewing it
                    del self._leased_at[job.id]
        for job in due:
            if job.id not in held:
                log.warning("job %s#%d: lease lost while running", job.type, job.id)

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True,
                                         application_name="pulse lease keeper",
                                         connect_timeout=5)
        return self._conn
