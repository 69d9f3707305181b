"""A long transaction from another client pins the xmin horizon while jobs
flow: vacuum and HOT pruning cannot remove the dead row versions that every
claim and completion leaves, so claims scan more and more of them.
Throughput may drop; correctness may not. The test prints the drop, the
dead-tuple growth of pulse_jobs, and what one claim costs before, at the
end of, and after the pin."""

from __future__ import annotations

import time
from datetime import datetime

import psycopg
import pytest

from pulsed.db.store import Store
from tests.chaos.harness import (BacklogKeeper, StatusWatch, account, accounting_fields,
                                 assert_daemon_healthy, check_accounting, completions_between,
                                 first_completion_after, now_utc, query, settle)
from tests.pg import wait_until

pytestmark = pytest.mark.timeout(300)

WORKERS = 2
BASELINE_S = 5
WARMUP_S = 3  # batch sizes adapt and caches warm before the baseline is taken
AFTER_S = 4
BACKLOG_LOW, BACKLOG_BATCH = 4000, 4000  # workers never run dry, the drain stays short


def dead_tuples(dsn: str) -> dict[str, int]:
    rows = query(dsn, "SELECT n_live_tup, n_dead_tup, n_tup_hot_upd, n_tup_upd "
                      "FROM pg_stat_user_tables WHERE relname = 'pulse_jobs'")
    live, dead, hot, upd = rows[0]
    return {"live": live, "dead": dead, "hot_updates": hot, "updates": upd}


def claim_cost_ms(dsn: str, probes: int = 5) -> float:
    """The median time of one claim of 10 jobs, rolled back (no side effect:
    the claim's own transaction is a savepoint inside one that rolls back)."""
    times = []
    with psycopg.connect(dsn, autocommit=True, application_name="chaos claim probe") as conn:
        while len(times) < probes:
            with conn.transaction(force_rollback=True):
                started = time.perf_counter()
                claimed = Store(conn).claim(owner="chaos-probe", limit=10, lease_ttl=30)
                elapsed = (time.perf_counter() - started) * 1000
            if claimed:
                times.append(elapsed)
                continue
            # The workers emptied the backlog between two of the keeper's
            # top-ups (0.1 s apart: 4,000 jobs is ~0.1 s of a fast host's
            # drain): a claim of nothing is no measure; wait for the next.
            wait_until(lambda: query(dsn, "SELECT count(*) FROM pulse_jobs "
                                          "WHERE state = 'available'")[0][0] > 0,
                       timeout=10, message="the backlog keeper's next top-up")
    return round(sorted(times)[len(times) // 2], 2)


def rate(dsn: str, ids: list[int], start: datetime, end: datetime) -> float:
    return completions_between(dsn, ids, start, end) / (end - start).total_seconds()


@pytest.mark.parametrize("pin_s", [15, pytest.param(60, marks=pytest.mark.slow, id="long")])
def test_long_transaction_pinning_xmin(daemon_factory, dsn, marks, record, pin_s):
    backlog = BacklogKeeper(dsn, BACKLOG_LOW, BACKLOG_BATCH, dir=str(marks))
    backlog.start()
    wait_until(lambda: len(backlog.ids) >= BACKLOG_LOW, timeout=30, message="the backlog")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE pulse_jobs")
    daemon = daemon_factory(workers=WORKERS).start()
    daemon.wait_ready()
    watch = StatusWatch(daemon, interval=1)
    watch.start()

    time.sleep(WARMUP_S)
    base_start = now_utc()
    time.sleep(BASELINE_S)
    base_end = now_utc()
    before = {"dead_tuples": dead_tuples(dsn), "claim_ms": claim_cost_ms(dsn)}

    pin = psycopg.connect(dsn, application_name="chaos long transaction")
    try:
        pin.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        pin.execute("SELECT txid_current(), count(*) FROM pulse_jobs").fetchone()
        pin_start = now_utc()
        time.sleep(pin_s)
        pin_end = now_utc()
        pinned = {"dead_tuples": dead_tuples(dsn), "claim_ms": claim_cost_ms(dsn)}
    finally:
        pin.rollback()
        pin.close()
    released = now_utc()
    time.sleep(AFTER_S)
    after_end = now_utc()
    after = {"dead_tuples": dead_tuples(dsn), "claim_ms": claim_cost_ms(dsn)}
    ids = backlog.stop()

    took = settle(dsn, ids, timeout=180)
    watch.stop()
    acc = account(dsn, ids, marks)
    rates = {"before": rate(dsn, ids, base_start, base_end),
             "pinned": rate(dsn, ids, pin_start, pin_end),
             "after": rate(dsn, ids, released, after_end)}
    rates = {k: round(v, 1) for k, v in rates.items()}
    drop = 1 - rates["pinned"] / rates["before"] if rates["before"] else None
    record(fault=f"transaction pinning xmin for {pin_s}s",
           load=f"backlog kept >= {BACKLOG_LOW} no-op jobs ({len(ids)} in all), "
                f"{WORKERS} workers",
           recovery_s=first_completion_after(dsn, ids, released),
           completed_per_s=rates, throughput_drop=None if drop is None else round(drop, 3),
           before=before, pinned=pinned, after=after,
           dead_tuple_growth=pinned["dead_tuples"]["dead"] - before["dead_tuples"]["dead"],
           settle_s=round(took, 3), restarts=watch.restarts, **accounting_fields(acc))

    check_accounting(acc, "after a long transaction pinned xmin")
    assert rates["pinned"] > 0, "no job completed while xmin was pinned"
    assert_daemon_healthy(daemon, watch)
