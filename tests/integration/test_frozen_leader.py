"""A leader frozen inside a transaction (issue 23, item 5).

SIGSTOP a leader whose scheduler is idle in a transaction, right after a
cron tick's claim: the claim share-locked the lease row, and the
follower's election waited behind that lock (45 s, then for as long as the
leader stayed frozen). Now the scheduler's sessions carry timeouts (the
server ends a transaction left idle, bounds lock waits and statements) and
the election never waits on the lease row's lock.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from types import SimpleNamespace

import psycopg
import pytest

import pulsed
from pulsed.config import default_config
from pulsed.db.store import (
    LEADER_NAME, SCHEDULER_IDLE_IN_TRANSACTION, SCHEDULER_LOCK_TIMEOUT,
    SCHEDULER_STATEMENT_TIMEOUT, Store, queries)
from pulsed.leadership import Leadership
from pulsed.scheduler import SchedulerLoop, scheduler_connect
from tests.pg import wait_until

pytestmark = pytest.mark.timeout(60)

TTL = 1.0  # shorter than the idle timeout: the lock outlives the lease
# How long an election may take: it must not wait for the lock.
ELECTION_NEVER_WAITS_S = 0.5
# From the lease's expiry to the follower's election: the idle timeout
# (the frozen session's lock outlives the lease by ~1 s here) plus a
# margin for two busy cores.
FAILOVER_AFTER_EXPIRY_S = 4.0


def seconds(setting: str) -> float:
    """'2s' / '500ms' -> seconds."""
    return float(setting[:-2]) / 1000 if setting.endswith("ms") else float(setting[:-1])


def session_settings(conn: psycopg.Connection) -> dict[str, str]:
    names = ("idle_in_transaction_session_timeout", "lock_timeout", "statement_timeout")
    return {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in names}


def test_the_schedulers_sessions_carry_the_timeouts(dsn: str) -> None:
    runtime = SimpleNamespace(ctx=SimpleNamespace(config=default_config(), dsn=dsn, alone=True))
    loop = SchedulerLoop(runtime, Leadership("node/1", 15))  # type: ignore[arg-type]
    try:
        settings = session_settings(loop.store().conn)
    finally:
        loop.conn.close()
    assert settings == {"idle_in_transaction_session_timeout": SCHEDULER_IDLE_IN_TRANSACTION,
                        "lock_timeout": SCHEDULER_LOCK_TIMEOUT,
                        "statement_timeout": SCHEDULER_STATEMENT_TIMEOUT}


def test_an_election_does_not_wait_for_a_lock_on_the_lease_row(dsn: str,
                                                               conn: psycopg.Connection) -> None:
    store = Store(conn)
    assert store.leader_elect("a", 30) == 1
    conn.execute("UPDATE pulse_leader SET expires_at = now() - interval '1 second'")
    with psycopg.connect(dsn) as holder:  # a session with no timeouts at all
        holder.execute("SELECT 1 FROM pulse_leader FOR SHARE")
        started = time.monotonic()
        assert store.leader_elect("b", 30) is None  # someone holds it
        assert time.monotonic() - started < ELECTION_NEVER_WAITS_S
        holder.rollback()
    assert store.leader_elect("b", 30) == 2


def test_a_follower_is_elected_soon_after_a_frozen_leaders_lease_expires(
        dsn: str, conn: psycopg.Connection) -> None:
    frozen = scheduler_connect(dsn)
    leader = Leadership("host-a/100", TTL)
    assert leader.refresh(Store(frozen)) and leader.term == 1
    expires_at = time.monotonic() + TTL
    # The cron duty's transaction, claim made, then the process is frozen
    # (SIGSTOP) before the job is enqueued: idle in transaction, holding a
    # share lock on the lease row.
    tick = datetime.now(timezone.utc).replace(microsecond=0)
    frozen.execute("BEGIN")
    assert Store(frozen).cron_claim_tick("every-second", tick, leader_id=leader.leader_id,
                                         term=leader.term)

    follower_conn = scheduler_connect(dsn)
    follower = Leadership("host-b/200", TTL)
    slowest = 0.0

    def elected() -> bool:
        nonlocal slowest
        started = time.monotonic()
        leading = follower.refresh(Store(follower_conn))
        slowest = max(slowest, time.monotonic() - started)
        return leading

    wait_until(elected, timeout=30, interval=0.05,
               message="the follower was never elected while the leader was frozen")
    after_expiry = time.monotonic() - expires_at
    print(f"frozen leader: follower elected {after_expiry:.2f}s after the lease expired; "
          f"slowest election attempt {slowest * 1000:.0f} ms")

    assert follower.term == 2
    assert after_expiry < FAILOVER_AFTER_EXPIRY_S
    assert slowest < ELECTION_NEVER_WAITS_S
    # The server ended the frozen session: its tick claim rolled back, so
    # the new leader enqueues that tick, and its writes would be refused.
    with pytest.raises(psycopg.Error):
        frozen.execute("SELECT 1")
    assert frozen.broken
    assert conn.execute("SELECT count(*) FROM pulse_cron_ticks").fetchone()[0] == 0
    assert Store(follower_conn).cron_claim_tick("every-second", tick,
                                                leader_id=follower.leader_id,
                                                term=follower.term)
    follower_conn.close()
    frozen.close()


def test_a_leader_cancelled_by_a_lock_timeout_keeps_its_session(dsn: str,
                                                               conn: psycopg.Connection) -> None:
    """The lock timeout cancels the statement, not the session: the
    scheduler loop retries that duty next round on the same connection."""
    leader_conn = scheduler_connect(dsn)
    store = Store(leader_conn)
    leadership = Leadership("host-a/100", 30)
    assert leadership.refresh(store)
    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT 1 FROM pulse_leader FOR UPDATE")
        started = time.monotonic()
        with pytest.raises(psycopg.errors.LockNotAvailable):
            store.promote_due(leader_id=leadership.leader_id, term=leadership.term)
        assert time.monotonic() - started < seconds(SCHEDULER_LOCK_TIMEOUT) + 1
        holder.rollback()
    assert store.promote_due(leader_id=leadership.leader_id, term=leadership.term) == []
    leader_conn.close()


def test_the_pruners_reply_is_one_row_however_many_it_deletes(conn: psycopg.Connection) -> None:
    """A reply of a batch's ids could fill the socket buffers of a leader
    frozen mid-reply: the statement, still sending, would hold the lease
    row's share lock, which no timeout ends."""
    pulsed.enqueue_many(conn, [{"type": "t"} for _ in range(3000)])
    conn.execute("UPDATE pulse_jobs SET state = 'completed', "
                 "finished_at = now() - interval '1 day'")
    leadership = Leadership("host-a/100", 30)
    assert leadership.refresh(Store(conn))
    reply = conn.execute(queries()["job_prune_finished"], {
        "state": "completed", "retention": 60.0, "limit": 10_000, "now": None,
        "leader_name": LEADER_NAME, "leader_id": leadership.leader_id,
        "term": leadership.term}).fetchall()
    assert reply == [(3000,)]
