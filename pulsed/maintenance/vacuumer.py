"""Vacuumer: VACUUM the jobs table when dead row versions pile up.

Every claim and every completion leaves a dead version of the job's row,
and the claim index keeps an entry for each claimed job until VACUUM
removes it. A claim walks the index from its head, past all of those, so a
long drain slows down as they accumulate: 12,000 -> 6,000 jobs/s over
500,000 jobs, measured (bench/README.md). Autovacuum visits a database at
most once a minute (autovacuum_naptime) and waits for a fifth of the table
to be dead, far too late for a queue. The leader runs VACUUM itself once
`dead_rows` dead versions (and at least a twentieth of the table) are
there: ~0.3-0.7 s for a 500,000-row table, and the rate then held within
13%.

VACUUM runs on a thread with its own connection, so the scheduler loop
keeps re-electing while it runs; one at a time per node. VACUUM changes no
data, so it needs no fence: at worst two leaders' vacuums queue on the
table lock, and a short lock_timeout makes the second give up. Dead rows a
VACUUM could not remove (an old transaction or a replication slot holds
them) do not trigger the next one: it waits for `dead_rows` new ones. A
user that does not own the table cannot VACUUM it (PostgreSQL only warns):
then the duty turns itself off and says so.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import psycopg

from pulsed.db.connect import connect
from pulsed.db.store import Store
from pulsed.leadership import Leadership

log = logging.getLogger(__name__)

VACUUM_CHECK_INTERVAL_S = 2.0
MIN_DEAD_FRACTION = 0.05  # of the table's live rows: big tables vacuum less often
LOCK_TIMEOUT = "1s"  # another VACUUM of the table is running: skip this one


@dataclass
class Vacuumer:
    dsn: str
    dead_rows: int  # 0: leave it to autovacuum
    interval: float = VACUUM_CHECK_INTERVAL_S
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _disabled: bool = field(default=False, init=False, repr=False)
    _left_behind: int = field(default=0, init=False, repr=False)  # dead after the last VACUUM

    def run_once(self, store: Store, leadership: Leadership) -> int:
        """Start a VACUUM if enough dead rows are there; the dead rows it
        was started for (0 when none was)."""
        if leadership.term is None or not self.dead_rows or self._disabled or self.running():
            return 0
        dead, live = store.jobs_dead_rows()
        if dead - self._left_behind < max(self.dead_rows, MIN_DEAD_FRACTION * live):
            return 0
        if not store.may_vacuum_jobs():
            self._disabled = True
            log.warning("the database user does not own pulse_jobs, so it cannot VACUUM it; "
                        "leaving that to autovacuum (run pulsed as the tables' owner, or set "
                        "scheduler.vacuum_dead_rows = 0 to silence this)")
            return 0
        self._thread = threading.Thread(target=self.vacuum, args=(dead,),
                                        name="pulse-vacuum", daemon=True)
        self._thread.start()
        return dead

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def vacuum(self, dead: int) -> None:
        started = time.monotonic()
        try:
            with connect(self.dsn, "vacuum") as conn:
                store = Store(conn)
                store.vacuum_jobs(LOCK_TIMEOUT)
                self._left_behind = store.jobs_dead_rows()[0]
        except psycopg.errors.LockNotAvailable:
            log.debug("VACUUM of pulse_jobs skipped: another one is running")
            return
        except psycopg.Error as exc:
            log.warning("VACUUM of pulse_jobs failed (will retry): %s", exc)
            return
        log.info("vacuumed pulse_jobs (%d dead row versions, %d left) in %.2fs", dead,
                 self._left_behind, time.monotonic() - started)
