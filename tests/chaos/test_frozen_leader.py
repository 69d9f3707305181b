"""A leader's whole daemon frozen (SIGSTOP of its process group) while its
scheduler is idle inside a cron tick's transaction (issue 23, item 5).

The tick's claim share-locks the lease row (the term fence) until the
transaction ends, and a frozen process never ends it: the follower's
election used to wait on that lock (45 s, then as long as the freeze
lasted) while no job was promoted and no lease reaped. Now the server ends
the frozen session (the scheduler's idle_in_transaction_session_timeout)
and the election never waits on the row's lock: the follower leads within
a few seconds of the lease's expiry, promotes the jobs that fell due and
enqueues the ticks; the thawed daemon follows without a crash.
"""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest

import pulsed
from tests.chaos.harness import account, accounting_fields, check_accounting, settle
from tests.pg import wait_until
from tests.system.daemon import Daemon, pid_alive
from tests.system.test_scheduler_cluster import with_cron

pytestmark = pytest.mark.timeout(180)

LEADER_TTL = 3.0
CRON_ENTRIES = 2
# A big payload widens the moment between a tick's claim and its job's
# insert (encoding and sending it) in which the test freezes the leader.
CRON_PAYLOAD_CHARS = 400_000
DELAYED_JOBS = 20  # enqueued once the leader is frozen: only a leader promotes them
DELAY_S = 1.0
# From the lease's expiry to the follower's election: one election round
# (leader_ttl / 3) plus a margin for two busy cores.
ELECTED_AFTER_EXPIRY_S = 3.0
FIND_WINDOW_S = 60.0

# The leader's scheduler session, idle inside a cron tick's transaction.
IN_CRON_TRANSACTION = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'pulse scheduler'
  AND state = 'idle in transaction' AND strpos(query, 'pulse_cron_ticks') > 0
"""


def live_leader(conn: psycopg.Connection) -> tuple[str, int, float] | None:
    """(leader_id, term, seconds until expiry) while the lease is live."""
    row = conn.execute("SELECT leader_id, term, EXTRACT(EPOCH FROM expires_at - now())::float8"
                       " FROM pulse_leader WHERE expires_at > now()").fetchone()
    return row


def freeze_inside_cron_transaction(daemon: Daemon, watcher: psycopg.Connection) -> int:
    """SIGSTOP the daemon's process group at a moment its scheduler is idle
    in a cron tick's transaction; return that backend's pid."""
    deadline = time.monotonic() + FIND_WINDOW_S
    while time.monotonic() < deadline:
        row = watcher.execute(IN_CRON_TRANSACTION).fetchone()
        if row is None:
            continue  # polling as fast as the server answers: the moment is short
        os.killpg(daemon.pid, signal.SIGSTOP)
        still = watcher.execute(IN_CRON_TRANSACTION + " AND pid = %s", (row[0],)).fetchone()
        if still:
            return row[0]
        os.killpg(daemon.pid, signal.SIGCONT)  # it had moved on: try again
    pytest.fail(f"never caught the leader idle in a cron transaction in {FIND_WINDOW_S:.0f}s")


def test_a_leader_frozen_inside_a_cron_transaction(daemon_factory, dsn, conn, record):
    cron = [{"name": f"beat-{i}", "type": "noop", "every": "1s",
             "payload": {"pad": "x" * CRON_PAYLOAD_CHARS}} for i in range(CRON_ENTRIES)]
    daemons = {name: with_cron(daemon_factory(name, workers=1,
                                              config={"scheduler": {"leader_ttl": LEADER_TTL}}),
                               cron).start()
               for name in "ab"}
    for daemon in daemons.values():
        daemon.wait_ready()
    leader_id, term, _left = wait_until(lambda: live_leader(conn), timeout=15,
                                        message="a first leader")
    frozen_name = next(name for name, d in daemons.items()
                       if d.scheduler() == int(leader_id.rsplit("/", 1)[1]))
    frozen, survivor = daemons[frozen_name], daemons["b" if frozen_name == "a" else "a"]

    with psycopg.connect(dsn, autocommit=True) as watcher:
        backend = freeze_inside_cron_transaction(frozen, watcher)
    frozen_at = time.monotonic()
    try:
        _id, _term, left = live_leader(conn) or (None, None, 0.0)
        expires_at = frozen_at + left
        ids = pulsed.enqueue_many(conn, [{"type": "noop", "delay": DELAY_S}
                                         for _ in range(DELAYED_JOBS)])
        new_id, new_term, _left = wait_until(
            lambda: (lead := live_leader(conn)) and lead[1] > term and lead,
            timeout=LEADER_TTL + 20, interval=0.02,
            message="a new leader while the old one is frozen inside a transaction")
        elected_at = time.monotonic()
        elected_db = conn.execute("SELECT now()").fetchone()[0]
        took = settle(dsn, ids, timeout=30)
        gone = conn.execute("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = %s",
                            (backend,)).fetchone()[0]
        wait_until(lambda: conn.execute("SELECT count(*) FROM pulse_cron_ticks WHERE tick >= %s",
                                        (elected_db,)).fetchone()[0],
                   timeout=10, message="a cron tick enqueued by the new leader")
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    frozen_for = time.monotonic() - frozen_at

    # Thawed, the old leader finds its session ended, reconnects and follows.
    wait_until(lambda: frozen.status()["leader"]["term"] == new_term, timeout=15,
               message=f"the thawed daemon never saw the new leader; log:\n{frozen.log_tail()}")
    restarts = {c["role"]: c["restarts"] for c in frozen.status()["children"]}
    acc = account(dsn, ids, None)
    after_expiry = elected_at - expires_at
    record(fault="SIGSTOP of the leader's whole pulsed while its scheduler is idle in a cron "
                 "tick's transaction (lease row share-locked)",
           load=f"{CRON_ENTRIES} cron entries every 1s, {DELAYED_JOBS} jobs due {DELAY_S:g}s "
                f"after the freeze, 2 daemons x 1 worker, leader_ttl {LEADER_TTL:g}s",
           recovery_s=after_expiry,
           elected_after_freeze_s=round(elected_at - frozen_at, 3),
           frozen_session_ended=gone, frozen_for_s=round(frozen_for, 3),
           settle_s=round(took, 3), thawed_restarts=restarts, **accounting_fields(acc))

    check_accounting(acc, "after freezing the leader inside a transaction")
    assert new_id.rsplit("/", 1)[0] == survivor.config["daemon"]["node_id"]
    assert after_expiry < ELECTED_AFTER_EXPIRY_S, (
        f"elected {after_expiry:.1f}s after the lease expired; log:\n{survivor.log_tail()}")
    assert gone, "the server did not end the frozen scheduler's session"
    assert restarts.get("scheduler") == 0, frozen.log_tail()
    assert pid_alive(frozen.pid) and pid_alive(survivor.pid)
