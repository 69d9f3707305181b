"""StatsRollup: the console's charts (issue 19) from a small in-database
rollup the leader writes once per bucket.

Every BUCKET_S the leader writes the bucket that just ended (and any it
missed in the last CATCH_UP_S, e.g. while no leader ran): per queue and type
and in total, completed and failed jobs, retried attempts, pickup latency
(p50, p95 of started_at - run_at of the jobs that finished) and the waiting
depth at the time of writing. The workers' fast path writes nothing for it;
the rollup reads the finished index by time (pulse_stats, migration 0012).
Rows older than KEEP_S are deleted, so the table holds at most
KEEP_S / BUCKET_S buckets x the (queue, type) pairs in use. Writes are
fenced by the leader term, and a bucket is written once."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from pulsed.db.store import LEADER_NAME, Store, queries
from pulsed.leadership import Leadership

BUCKET_S = 10.0
KEEP_S = 3900.0  # the charts show an hour; a little more so the left edge is full
CATCH_UP_S = 300.0  # buckets missed while no leader ran: written late (depth as of then)
CHECK_INTERVAL_S = 2.0
EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)


def bucket_start(moment: datetime) -> datetime:
    """The start of the bucket `moment` falls in (aligned on EPOCH)."""
    seconds = (moment - EPOCH).total_seconds()
    return EPOCH + timedelta(seconds=seconds - seconds % BUCKET_S)


@dataclass
class StatsRollup:
    interval: float = CHECK_INTERVAL_S
    _last: datetime | None = None  # the last bucket written (or found written)

    def run_once(self, store: Store, leadership: Leadership) -> int:
        """Write the buckets that ended since the last one; returns the rows
        written (0 for a deposed leader: the fence lets none through)."""
        if leadership.term is None:  # a lost lease: never write unfenced
            return 0
        fence = {"leader_name": LEADER_NAME, "leader_id": leadership.leader_id,
                 "term": leadership.term}
        now = store.conn.execute("SELECT now()").fetchone()[0]
        ended = bucket_start(now) - timedelta(seconds=BUCKET_S)
        if self._last is None:
            row = store.conn.execute(queries()["stats_last_bucket"]).fetchone()
            self._last = row[0] if row and row[0] is not None else None
        first = ended - timedelta(seconds=CATCH_UP_S)
        if self._last is not None:
            first = max(first, self._last + timedelta(seconds=BUCKET_S))
        written = 0
        if first <= ended:  # every bucket missed, in one statement
            cursor = store.conn.execute(queries()["stats_rollup"],
                                        {**fence, "first": first, "last": ended, "width": BUCKET_S})
            written = max(cursor.rowcount, 0)
        # Past these buckets either way: one another leader wrote already
        # (ON CONFLICT) or, fenced out, the current leader writes.
        self._last = max(self._last or ended, ended)
        if written:
            store.conn.execute(queries()["stats_prune"], {**fence, "keep": KEEP_S})
        return written


def rollup_size(store: Store) -> dict[str, Any]:
    """The table's rows and bytes (the bound the docs state, measured)."""
    row = store.conn.execute("SELECT count(*), pg_total_relation_size('pulse_stats') "
                             "FROM pulse_stats").fetchone()
    return {"rows": row[0], "bytes": row[1]}
