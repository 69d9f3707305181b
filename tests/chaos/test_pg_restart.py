"""PostgreSQL restarted under load: a private server is stopped (fast or
immediate) while a pulsed with 3 workers drains a backlog, kept down a few
seconds, and started again. Workers and the scheduler must reconnect with
backoff (no crash loop, the master stays up and answers status), and every
job completes: none lost, none left running."""

from __future__ import annotations

import time

import pytest

from tests.chaos.harness import (StatusWatch, account, accounting_fields, assert_daemon_healthy,
                                 check_accounting, completion_gaps, enqueue_load,
                                 first_completion_after, now_utc, settle, wait_progress)

pytestmark = pytest.mark.timeout(240)

LEASE_TTL = 5  # a completion lost with a dropped connection runs again after this
WORKERS = 3


@pytest.mark.parametrize("mode,jobs,down_s", [
    ("immediate", 2000, 3),
    pytest.param("fast", 5000, 10, marks=pytest.mark.slow, id="fast-long"),
    pytest.param("immediate", 5000, 10, marks=pytest.mark.slow, id="immediate-long"),
])
def test_postgres_restart_under_load(private_pg, daemons_on, marks, record, mode, jobs, down_s):
    pg = private_pg()
    ids = enqueue_load(pg.dsn, jobs, "work", s=0.004, dir=str(marks))
    daemon = daemons_on(pg.dsn, workers=WORKERS,
                        config={"worker": {"lease_ttl": LEASE_TTL}}).start()
    daemon.wait_ready()
    watch = StatusWatch(daemon)
    watch.start()

    wait_progress(pg.dsn, ids, jobs // 5, timeout=60,
                  message=f"a fifth of the jobs done before the fault; log:\n{daemon.log_tail()}")
    fault_start = now_utc()
    pg.stop(mode=mode)
    time.sleep(down_s)  # the fault itself: the server stays down this long
    pg.start()
    back = now_utc()

    took = settle(pg.dsn, ids, timeout=60 + LEASE_TTL)
    watch.stop()
    acc = account(pg.dsn, ids, marks)
    recovery = first_completion_after(pg.dsn, ids, back)
    gap = completion_gaps(pg.dsn, ids, fault_start, now_utc())
    record(fault=f"PostgreSQL {mode} stop, down {down_s}s", load=f"{jobs} jobs x 4 ms, "
           f"{WORKERS} workers", recovery_s=recovery, longest_gap_s=round(gap, 3),
           drain_after_restart_s=round(took, 3), restarts=watch.restarts,
           **accounting_fields(acc))

    check_accounting(acc, f"after a PostgreSQL {mode} restart")
    assert recovery is not None and recovery < 15, "no completion within 15 s of the restart"
    assert_daemon_healthy(daemon, watch)
