"""CronEnqueuer: each [[cron]] tick enqueued exactly once, cluster-wide.

A tick is claimed by inserting (name, tick) into pulse_cron_ticks in the
same transaction that enqueues its job, fenced by the leader term: two
leaders (or one leader twice) can never enqueue the same tick. Ticks that
fell while no leader existed are enqueued late when the entry says
`catch_up = true`; otherwise only the newest of them is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Sequence

from pulsed import metrics
from pulsed.config import CronEntry, cron_job_params
from pulsed.cron import Schedule
from pulsed.db.store import Store
from pulsed.errors import JobInputError
from pulsed.leadership import Leadership

log = logging.getLogger(__name__)

CRON_INTERVAL_S = 1.0
MAX_CATCH_UP_TICKS = 1000
# How far back a cron expression is searched for its latest tick.
LOOKBACK = timedelta(days=2)
# How far back, after the entry's last tick, a missed tick is looked for: a
# weekly or monthly entry's tick that fell during an outage longer than
# LOOKBACK is still enqueued late (only the newest one unless catch_up).
MISSED_LOOKBACK = timedelta(days=35)


@dataclass
class CronEnqueuer:
    entries: Sequence[CronEntry]
    interval: float = CRON_INTERVAL_S
    # None: the database's now(). Not the host's wall clock: a leader
    # minutes ahead fired ticks early and labelled them in the future (a
    # correct leader after it then fired nothing until the database's time
    # passed them); one behind fired each tick late.
    clock: Callable[[], datetime] | None = None

    def __post_init__(self) -> None:
        self.schedules = [Schedule(entry) for entry in self.entries]
        self.refused: set[str] = set()  # entries whose job enqueue refused, logged once
        # name -> (last, until): no tick in (last, until] (searched already),
        # so a rare entry's search goes on from `until` instead of walking
        # the weeks since its last tick every second.
        self._no_tick: dict[str, tuple[datetime, datetime]] = {}

    def run_once(self, store: Store, leadership: Leadership) -> int:
        if leadership.term is None or not self.schedules:
            return 0  # no entries: not even the clock's query
        now = self.clock() if self.clock is not None else store.db_now()
        return sum(self._run_entry_alone(store, leadership, schedule, now)
                   for schedule in self.schedules)

    def _run_entry_alone(self, store: Store, leadership: Leadership, schedule: Schedule,
                         now: datetime) -> int:
        """One entry whose job is refused must not stop the others, nor the
        scheduler's other duties (the config's checks refuse such entries
        at load; this is for a value they let through)."""
        try:
            return self._run_entry(store, leadership, schedule, now)
        except JobInputError as exc:
            if schedule.entry.name not in self.refused:
                self.refused.add(schedule.entry.name)
                log.error("cron %s: its job is refused (%s); skipping the entry until the "
                          "config is fixed", schedule.entry.name, exc)
            return 0

    def _run_entry(self, store: Store, leadership: Leadership, schedule: Schedule,
                   now: datetime) -> int:
        entry = schedule.entry
        last = store.cron_last_tick(entry.name)
        latest = self._latest_tick(schedule, last, now)
        if latest is None or (last is not None and latest <= last):
            return 0
        if last is None and now - latest > timedelta(seconds=2 * self.interval):
            # A new entry waits for its next tick, as cron does: a daily job
            # deployed at 10:00 runs tomorrow, not at once for 03:00.
            self._take_tick(store, leadership, entry, latest, enqueue=False)
            return 0
        ticks = [latest]
        if last is not None and entry.catch_up:
            ticks = list(schedule.ticks_between(last, now, limit=MAX_CATCH_UP_TICKS))
        return sum(self._take_tick(store, leadership, entry, tick) for tick in ticks)

    def _latest_tick(self, schedule: Schedule, last: datetime | None,
                     now: datetime) -> datetime | None:
        """The newest tick <= now: within LOOKBACK, or since `last` (at
        most MISSED_LOOKBACK back) for an entry that has ticked before."""
        if last is None or schedule.every:  # `every` has no horizon: arithmetic
            return schedule.latest_at_or_before(now, horizon=LOOKBACK)
        name = schedule.entry.name
        start = max(last, now - MISSED_LOOKBACK)
        searched = self._no_tick.get(name)
        if searched is not None and searched[0] == last and searched[1] <= now:
            start = max(start, searched[1])
        latest = schedule.latest_at_or_before(now, horizon=now - start)
        if latest is None or latest <= last:
            self._no_tick[name] = (last, now)
        return latest

    def _take_tick(self, store: Store, leadership: Leadership, entry: CronEntry,
                   tick: datetime, *, enqueue: bool = True) -> int:
        """Claim the tick and enqueue its job in one transaction."""
        with store.conn.transaction():
            if not store.cron_claim_tick(entry.name, tick, leader_id=leadership.leader_id,
                                         term=leadership.term):
                return 0
            if not enqueue:
                return 0
            params = cron_job_params(entry, tick)
            job_id, _created = store.insert_job(params)
            store.cron_set_job(entry.name, tick, job_id)
        metrics.jobs_enqueued(entry.type, "cron")
        log.info("cron %s: enqueued tick %s as job %s#%d", entry.name, tick.isoformat(),
                 entry.type, job_id)
        return 1
