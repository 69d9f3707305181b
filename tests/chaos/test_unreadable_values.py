"""Rows PostgreSQL stores but Python cannot read, under a real pulsed
(issue 23, item 2): run_at in year 1 BC (what datetime(1, 1, 1) at +14:00
became before the door refused it), in year 10000 and -infinity, written
by SQL directly and available. Each claim that got one used to commit,
fail to load the row and kill the worker: every worker crash-looped in
backoff and 100 later jobs took 22 s. Now the claim fails that job with
the value named and the workers carry on."""

from __future__ import annotations

import time

import pytest

import pulsed
from tests.chaos.harness import account, accounting_fields, check_accounting, settle
from tests.pg import wait_until

pytestmark = pytest.mark.timeout(120)

WORKERS = 2
GOOD_JOBS = 100
BAD_RUN_ATS = ("0001-12-31 10:00:00+00 BC", "10000-01-01 00:00:00+00", "-infinity")
QUICKLY_S = 10.0  # generous for two shared cores; the 100 jobs alone take well under 1 s


def test_unreadable_rows_fail_alone_under_a_real_daemon(daemon_factory, dsn, conn, record):
    bad = [conn.execute("INSERT INTO pulse_jobs (type, state, run_at) "
                        "VALUES ('noop', 'available', %s) RETURNING id", (run_at,)).fetchone()[0]
           for run_at in BAD_RUN_ATS]
    ids = pulsed.enqueue_many(conn, [{"type": "noop"} for _ in range(GOOD_JOBS)])
    daemon = daemon_factory("a", workers=WORKERS)
    started = time.monotonic()
    daemon.start()
    took = settle(dsn, ids + bad, timeout=60)
    elapsed = time.monotonic() - started

    acc = account(dsn, ids, None)
    failed = {row[0]: row[1] for row in conn.execute(
        "SELECT id, last_error FROM pulse_jobs WHERE id = ANY(%s) AND state = 'failed'", (bad,))}
    daemon.wait_ready()
    restarts = sum(child["restarts"] for child in daemon.status()["children"])
    record(fault="rows with run_at 1 BC, 10000 and -infinity (inserted by SQL), available",
           load=f"{GOOD_JOBS} no-op jobs, {WORKERS} workers, from daemon start",
           recovery_s=elapsed, settle_s=round(took, 3), bad_failed=len(failed),
           child_restarts=restarts, **accounting_fields(acc))

    check_accounting(acc, "with unreadable rows among the jobs")
    assert sorted(failed) == sorted(bad)
    for job_id, run_at in zip(bad, BAD_RUN_ATS):
        assert f"run_at '{run_at}' cannot be read" in failed[job_id], failed[job_id]
    assert restarts == 0, daemon.log_tail()
    assert elapsed < QUICKLY_S
    wait_until(lambda: len(daemon.workers()) == WORKERS, timeout=10,
               message="the workers are still up")
