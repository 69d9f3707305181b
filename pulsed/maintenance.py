"""The leader's periodic duties. Each is a small unit whose run_once() the
scheduler loop and the tests both call; every write is fenced by the term."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pulsed.db.store import Store
from pulsed.leadership import Leadership

log = logging.getLogger(__name__)

PROMOTE_BATCH = 5000
REAP_BATCH = 1000


@dataclass
class Promoter:
    """Moves due scheduled and retryable jobs to available, and wakes
    workers for the queues that received work."""

    batch: int = PROMOTE_BATCH

    def run_once(self, store: Store, leadership: Leadership) -> int:
        rows = store.promote_due(limit=self.batch, leader_id=leadership.leader_id,
                                 term=leadership.term)
        if rows:
            store.notify(sorted({r["queue"] for r in rows}))
        return len(rows)


@dataclass
class Reaper:
    """Takes back leases that expired (a vanished host, a hung worker)."""

    batch: int = REAP_BATCH

    def run_once(self, store: Store, leadership: Leadership) -> int:
        ids = store.reap_expired(limit=self.batch, leader_id=leadership.leader_id,
                                 term=leadership.term)
        if ids:
            log.warning("reaped %d expired leases: %s", len(ids), ids[:20])
            store.notify(["default"])
        return len(ids)
