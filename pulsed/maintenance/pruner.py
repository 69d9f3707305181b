"""Pruners: finished jobs past their retention, dead nodes' registry rows."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pulsed.config import Config
from pulsed.db.store import Store
from pulsed.leadership import Leadership

log = logging.getLogger(__name__)

PRUNE_BATCH = 10_000
PRUNE_INTERVAL_S = 2.0
PRUNE_BUDGET_S = 1.0  # per pass; the loop must get back to re-electing
# A node none of whose processes heartbeated for this long is gone.
DEAD_NODE_AFTER_S = 120.0
REGISTRY_PRUNE_INTERVAL_S = 30.0
CRON_TICK_HORIZON_S = 7 * 86400.0


@dataclass
class Pruner:
    """Deletes completed, failed and cancelled jobs (with their attempt
    history) once older than their retention, a batch per state per pass;
    this keeps the jobs table bounded and frees idempotency keys."""

    retention: dict[str, float]
    interval: float = PRUNE_INTERVAL_S
    batch: int = PRUNE_BATCH

    @classmethod
    def from_config(cls, config: Config) -> "Pruner":
        scheduler = config.scheduler
        return cls({"completed": scheduler.retention_completed,
                    "failed": scheduler.retention_failed,
                    "cancelled": scheduler.retention_cancelled})

    def run_once(self, store: Store, leadership: Leadership) -> int:
        """Delete full batches until a state is caught up or the time budget
        is spent (so re-election is never held up); the rows deleted."""
        if leadership.term is None:
            return 0
        pruned = 0
        deadline = time.monotonic() + PRUNE_BUDGET_S
        for state, retention in self.retention.items():
            while True:
                count = store.prune_finished(state, retention, limit=self.batch,
                                             leader_id=leadership.leader_id,
                                             term=leadership.term)
                pruned += count
                if count < self.batch or time.monotonic() >= deadline:
                    break
        if pruned:
            log.info("pruned %d finished job(s) past retention", pruned)
        return pruned


@dataclass
class RegistryPruner:
    """Forgets nodes that stopped heartbeating, and old cron ticks."""

    interval: float = REGISTRY_PRUNE_INTERVAL_S
    max_age: float = DEAD_NODE_AFTER_S

    def run_once(self, store: Store, leadership: Leadership) -> int:
        if leadership.term is None:
            return 0
        gone = store.processes_prune_dead(self.max_age, leader_id=leadership.leader_id,
                                          term=leadership.term)
        for node in sorted({r["node_id"] for r in gone}):
            log.warning("node %s stopped heartbeating; removed from the registry", node)
        store.cron_prune_ticks(CRON_TICK_HORIZON_S, leader_id=leadership.leader_id,
                               term=leadership.term)
        return len(gone)
