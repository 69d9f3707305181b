"""LeaseKeeper: the leases in a worker's ledger, kept honest from a thread.

While the worker's job runners are inside handlers, this thread renews
every held lease before it can expire, gives back prefetched jobs held up
for over a second (behind a long-running job, or behind many slower than
the batch was sized for) so they run elsewhere, and writes completions
that waited too long for the next claim (`on_tick`).

It uses the worker's own connection (through the worker's `db()`, which
serialises the threads on it): a worker that could open one connection can
keep its leases, however scarce connections are on the server.
"""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager
from typing import Callable

import psycopg

from pulsed.db.store import Store
from pulsed.jobs import Job
from pulsed.ledger import JobLedger

log = logging.getLogger(__name__)

# Prefetched jobs wait in a worker at most this long (plus a tick) before
# they go back to the queue to run elsewhere.
GIVE_BACK_AFTER_S = 1.0
KEEPER_TICK_S = 0.5


class LeaseKeeper:
    def __init__(self, ledger: JobLedger, db: Callable[[], AbstractContextManager[Store]],
                 lease_ttl: float, *, give_back_after: float | None = GIVE_BACK_AFTER_S) -> None:
        self.ledger = ledger
        self.db = db
        self.lease_ttl = lease_ttl
        self.give_back_after = give_back_after  # None: never (jobs start at once)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Called on this thread every tick (the worker's late completions).
        self.on_tick: Callable[[], None] | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pulse-lease-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(min(KEEPER_TICK_S, self.lease_ttl / 3)):
            self.tick()

    def tick(self) -> None:
        try:
            try:
                self.give_back_held_up()
                self.renew_due()
            finally:  # the worker's own duties (stopping cancelled tasks needs no
                if self.on_tick is not None:  # database) run in an outage too
                    self.on_tick()
        except psycopg.Error as exc:
            log.warning("lease keeper: database error (will retry): %s", exc)

    def give_back_held_up(self) -> list[Job]:
        """Return the unstarted rest of a batch to the queue once it has
        been held longer than give_back_after: behind one job that runs
        long, or behind many that each took longer than the batch was sized
        for (a batch is sized from the jobs seen so far, up to prefetch)."""
        if self.give_back_after is None:
            return []
        jobs = self.ledger.take_unstarted(held_over=self.give_back_after)
        if jobs:
            with self.db() as store:
                given = store.give_back(jobs)
                if given:
                    store.notify(sorted({r["queue"] for r in given}))
            running = self.ledger.running()
            behind = f"job {running[0].type}#{running[0].id}" if running else "the batch"
            log.info("gave back %d prefetched job(s) held for over %.1fs behind %s",
                     len(given), self.give_back_after, behind)
        return jobs

    def renew_due(self) -> None:
        """Renew every held lease set more than a third of the TTL ago."""
        due = self.ledger.due_for_renewal(self.lease_ttl / 3)
        if not due:
            return
        with self.db() as store:
            held = store.renew_leases(due, self.lease_ttl)
        for job in self.ledger.renewed(due, held):
            log.warning("job %s#%d: lease lost while running", job.type, job.id)
