"""Leader election through a lease row with a term that only grows.

Elect: take the row when it is free or expired (term + 1). Re-elect: extend
it only while still its holder with the same term. Resign on a clean stop.
A leader trusts its lease only until `ttl - margin` after the request that
last extended it was *sent* (monotonic clock), so it stops acting before
any other node can have taken over. Maintenance writes are also fenced by
the term in SQL, so a deposed leader's late writes change nothing.

An election never waits for the lease row's lock (a leader frozen inside a
transaction may hold it): a locked row counts as held, and the scheduler's
session timeouts (SCHEDULER_SESSION) make the server end such a
transaction, so the next round can take the row.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pulsed.db.store import Store

log = logging.getLogger(__name__)

TRUST_MARGIN_FRACTION = 0.2  # stop acting 20% of the TTL before expiry


@dataclass
class Leadership:
    leader_id: str
    ttl: float
    term: int | None = None
    trusted_until: float = 0.0

    @property
    def is_leader(self) -> bool:
        return self.term is not None and time.monotonic() < self.trusted_until

    def refresh(self, store: Store) -> bool:
        """Elect or re-elect; return whether this process leads now."""
        sent_at = time.monotonic()
        if self.term is not None and store.leader_reelect(self.leader_id, self.term, self.ttl):
            self.trusted_until = sent_at + self.ttl * (1 - TRUST_MARGIN_FRACTION)
            return True
        if self.term is not None:
            log.warning("lost leadership (term %d)", self.term)
            self.term = None
        term = store.leader_elect(self.leader_id, self.ttl)
        if term is not None:
            self.term = term
            self.trusted_until = sent_at + self.ttl * (1 - TRUST_MARGIN_FRACTION)
            log.info("elected leader, term %d", term)
        return self.is_leader

    def resign(self, store: Store) -> None:
        if self.term is not None:
            store.leader_resign(self.leader_id, self.term)
            log.info("resigned leadership (term %d)", self.term)
        self.term = None
        self.trusted_until = 0.0
