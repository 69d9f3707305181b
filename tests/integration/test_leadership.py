"""Leader election through the pulse_leader lease row (pulsed/leadership.py).

The store's leader_* queries against a real database: elect, re-elect,
resign, expiry and takeover, terms that only grow; and Leadership's trust
window on the monotonic clock.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import psycopg
import pytest

import pulsed.leadership as leadership_module
from pulsed.db.store import LEADER_NAME, Store
from pulsed.leadership import TRUST_MARGIN_FRACTION, Leadership
from tests.pg import wait_until

pytestmark = pytest.mark.timeout(60)

TTL = 30.0


@pytest.fixture
def store(conn: psycopg.Connection) -> Store:
    return Store(conn)


def expire_lease(conn: psycopg.Connection) -> None:
    """Simulate the holder going silent for longer than its TTL."""
    conn.execute("UPDATE pulse_leader SET expires_at = now() - interval '1 second'")


def lease_row(conn: psycopg.Connection) -> tuple[str, int, float]:
    """(leader_id, term, seconds until the lease expires)."""
    row = conn.execute(
        "SELECT leader_id, term, EXTRACT(EPOCH FROM expires_at - now())::float8"
        " FROM pulse_leader WHERE name = %s", (LEADER_NAME,)).fetchone()
    assert row is not None, "no lease row"
    return row


# -- the store's queries -----------------------------------------------------------------


def test_first_election_gives_term_1(store, conn):
    assert store.leader_get() is None
    assert store.leader_elect("a", TTL) == 1
    leader_id, term, remaining = lease_row(conn)
    assert (leader_id, term) == ("a", 1)
    assert TTL - 5 < remaining <= TTL
    assert store.leader_get() == {"leader_id": "a", "term": 1, "live": True}


def test_a_second_candidate_is_refused_while_the_lease_is_live(store, conn):
    assert store.leader_elect("a", TTL) == 1
    assert store.leader_elect("b", TTL) is None
    assert store.leader_elect("b", TTL) is None
    assert lease_row(conn)[:2] == ("a", 1)


def test_the_holder_cannot_elect_itself_again_for_a_new_term(store, conn):
    # Electing is for taking a free or expired lease; a live holder re-elects.
    assert store.leader_elect("a", TTL) == 1
    assert store.leader_elect("a", TTL) is None
    assert lease_row(conn)[:2] == ("a", 1)


def test_reelect_extends_the_lease_and_keeps_the_term(store, conn):
    assert store.leader_elect("a", 5) == 1
    assert lease_row(conn)[2] <= 5
    assert store.leader_reelect("a", 1, TTL) is True
    leader_id, term, remaining = lease_row(conn)
    assert (leader_id, term) == ("a", 1)
    assert remaining > 5


def test_reelect_with_a_wrong_term_or_by_another_node_fails(store, conn):
    assert store.leader_elect("a", TTL) == 1
    assert store.leader_reelect("a", 2, TTL) is False
    assert store.leader_reelect("b", 1, TTL) is False
    assert lease_row(conn)[:2] == ("a", 1)


def test_after_expiry_another_candidate_gets_term_2_and_the_old_holder_cannot_reelect(
        store, conn):
    assert store.leader_elect("a", TTL) == 1
    expire_lease(conn)
    assert store.leader_get()["live"] is False
    assert store.leader_elect("b", TTL) == 2
    assert store.leader_reelect("a", 1, TTL) is False
    assert store.leader_elect("a", TTL) is None
    assert lease_row(conn)[:2] == ("b", 2)
    assert store.leader_get() == {"leader_id": "b", "term": 2, "live": True}


def test_the_old_holder_may_win_again_after_expiry_but_with_a_new_term(store, conn):
    assert store.leader_elect("a", TTL) == 1
    expire_lease(conn)
    assert store.leader_elect("a", TTL) == 2
    assert store.leader_reelect("a", 1, TTL) is False
    assert store.leader_reelect("a", 2, TTL) is True


def test_resign_lets_another_candidate_take_over_at_once(store, conn):
    assert store.leader_elect("a", TTL) == 1
    store.leader_resign("a", 1)
    assert store.leader_get()["live"] is False
    assert store.leader_elect("b", TTL) == 2


def test_resign_by_a_deposed_holder_changes_nothing(store, conn):
    assert store.leader_elect("a", TTL) == 1
    expire_lease(conn)
    assert store.leader_elect("b", TTL) == 2
    store.leader_resign("a", 1)  # late: a's term is over
    store.leader_resign("a", 2)  # and a never held term 2
    assert store.leader_get() == {"leader_id": "b", "term": 2, "live": True}
    assert store.leader_elect("c", TTL) is None


def test_terms_only_grow(store, conn):
    terms = []
    for i in range(12):
        candidate = "abc"[i % 3]
        term = store.leader_elect(candidate, TTL)
        assert term is not None
        terms.append(term)
        assert store.leader_reelect(candidate, term, TTL)
        if i % 2:
            store.leader_resign(candidate, term)
        else:
            expire_lease(conn)
    assert terms == list(range(1, 13))


def test_concurrent_candidates_elect_exactly_one(dsn):
    candidates = 6
    barrier = threading.Barrier(candidates)
    results: dict[str, int | None] = {}

    def run(name: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as own:
            barrier.wait(timeout=10)
            results[name] = Store(own).leader_elect(name, TTL)

    threads = [threading.Thread(target=run, args=(f"n{i}",)) for i in range(candidates)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    winners = {name: term for name, term in results.items() if term is not None}
    assert len(results) == candidates
    assert list(winners.values()) == [1], results


# -- Leadership ------------------------------------------------------------------------------


def test_leadership_refresh_elects_then_reelects_with_the_same_term(store):
    lead = Leadership("a", TTL)
    assert not lead.is_leader
    assert lead.refresh(store) is True
    assert (lead.term, lead.is_leader) == (1, True)
    assert lead.refresh(store) is True
    assert lead.term == 1


def test_leadership_follower_is_not_leader(store):
    first, second = Leadership("a", TTL), Leadership("b", TTL)
    assert first.refresh(store)
    assert second.refresh(store) is False
    assert second.term is None and not second.is_leader


def test_leadership_notices_it_was_deposed_and_cannot_win_back_the_live_lease(store, conn):
    first, second = Leadership("a", TTL), Leadership("b", TTL)
    assert first.refresh(store)
    expire_lease(conn)
    assert second.refresh(store) and second.term == 2
    assert first.refresh(store) is False
    assert first.term is None and not first.is_leader
    assert store.leader_get() == {"leader_id": "b", "term": 2, "live": True}


def test_leadership_resign_hands_over_at_once(store):
    first, second = Leadership("a", TTL), Leadership("b", TTL)
    assert first.refresh(store)
    first.resign(store)
    assert not first.is_leader and first.term is None
    assert second.refresh(store) is True
    assert second.term == 2


def test_leadership_resign_when_not_leading_is_harmless(store):
    first, second = Leadership("a", TTL), Leadership("b", TTL)
    assert first.refresh(store)
    second.refresh(store)
    second.resign(store)
    assert store.leader_get() == {"leader_id": "a", "term": 1, "live": True}


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


def test_leadership_stops_trusting_its_lease_before_the_ttl(store, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(leadership_module, "time", SimpleNamespace(monotonic=clock.monotonic))
    ttl = 10.0
    lead = Leadership("a", ttl)
    assert lead.refresh(store)
    window = ttl * (1 - TRUST_MARGIN_FRACTION)
    assert window < ttl
    clock.now += window - 0.001
    assert lead.is_leader
    clock.now += 0.001
    assert not lead.is_leader
    # Its term is kept: a refresh (re-elect) in time restores trust.
    assert lead.term == 1
    assert lead.refresh(store) and lead.is_leader and lead.term == 1


def test_leadership_trust_window_counts_from_when_the_request_was_sent(store, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(leadership_module, "time", SimpleNamespace(monotonic=clock.monotonic))
    slow = Store(store.conn)
    real_elect = slow.leader_elect

    def elect_taking_3s(leader_id: str, ttl: float) -> int | None:
        term = real_elect(leader_id, ttl)
        clock.now += 3.0  # the reply arrives late
        return term

    slow.leader_elect = elect_taking_3s  # type: ignore[method-assign]
    lead = Leadership("a", 10.0)
    sent = clock.now
    assert lead.refresh(slow)
    assert lead.trusted_until == pytest.approx(sent + 10.0 * (1 - TRUST_MARGIN_FRACTION))


def test_leadership_with_a_short_ttl_stops_leading_before_its_lease_expires(store):
    ttl = 2.0
    lead = Leadership("a", ttl)
    assert lead.refresh(store)
    wait_until(lambda: not lead.is_leader, timeout=ttl + 2, interval=0.01,
               message="the leader to stop trusting its lease")
    # It stopped acting while the lease in the database was still live:
    # nobody else could have been elected yet.
    assert store.leader_get()["live"] is True
    assert Store(store.conn).leader_elect("b", ttl) is None
    wait_until(lambda: not store.leader_get()["live"], timeout=ttl + 2, interval=0.05,
               message="the lease to expire")
    assert store.leader_elect("b", ttl) == 2
    assert lead.refresh(store) is False

