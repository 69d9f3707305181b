"""Reaper: leases that expired go back to the queue."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pulsed import metrics
from pulsed.db.store import Store
from pulsed.leadership import Leadership

log = logging.getLogger(__name__)

REAP_BATCH = 1000
REAP_INTERVAL_S = 1.0


@dataclass
class Reaper:
    """Takes back leases that expired: a host that vanished, a worker hung
    past its lease, a master that could not release. Jobs with attempts
    left are available at once; the attempt is recorded `lease_expired`."""

    interval: float = REAP_INTERVAL_S
    batch: int = REAP_BATCH

    def run_once(self, store: Store, leadership: Leadership) -> int:
        if leadership.term is None:  # a lost lease: never write unfenced
            return 0
        rows = store.reap_expired(limit=self.batch, leader_id=leadership.leader_id,
                                  term=leadership.term)
        metrics.leases_reaped(len(rows))
        if rows:
            log.warning("reaped %d expired lease(s): %s", len(rows), [r["id"] for r in rows][:20])
            store.notify(sorted({r["queue"] for r in rows}))
        return len(rows)
