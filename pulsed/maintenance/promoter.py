"""Promoter: due scheduled and retryable jobs become available."""

from __future__ import annotations

from dataclasses import dataclass

from pulsed.db.store import Store
from pulsed.leadership import Leadership

PROMOTE_BATCH = 5000
PROMOTE_INTERVAL_S = 1.0


@dataclass
class Promoter:
    """Moves due scheduled and retryable jobs to available, and wakes the
    workers (one NOTIFY per pass, not per job)."""

    interval: float = PROMOTE_INTERVAL_S
    batch: int = PROMOTE_BATCH

    def run_once(self, store: Store, leadership: Leadership) -> int:
        if leadership.term is None:  # a lost lease: never write unfenced
            return 0
        rows = store.promote_due(limit=self.batch, leader_id=leadership.leader_id,
                                 term=leadership.term)
        if rows:
            store.notify(sorted({r["queue"] for r in rows}))
        return len(rows)
