"""The hot statements keep their cheap plans however stale the statistics.

A batch completion once walked the partial lease index (statistics from a
moment when nothing ran said it held one row) and tested every (id, token)
pair against every running job: 100 completions beside 100 other leases
cost 8 ms instead of 1 ms. These tests read the plans PostgreSQL picks in
that situation, including the generic plan a prepared statement ends up
with."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest

from pulsed.db.store import Store, queries

BATCH = 100
BACKLOG = 100_000  # enough rows that reading the whole table is never the cheap plan


@pytest.fixture
def leased(conn: psycopg.Connection) -> list[Any]:
    """Two workers holding 100 leases each in a backlog, planned on
    statistics taken while no job ran."""
    conn.execute("INSERT INTO pulse_jobs (type, state) "
                 "SELECT 'plan', 'available' FROM generate_series(1, %s)", (BACKLOG,))
    conn.commit()
    conn.execute("ANALYZE pulse_jobs")
    conn.commit()
    store = Store(conn)
    mine = store.claim(owner="a", limit=BATCH, lease_ttl=60)
    store.claim(owner="b", limit=BATCH, lease_ttl=60)
    conn.commit()
    return mine


@pytest.mark.parametrize("name", ["job_complete_many", "job_renew_leases", "job_give_back"])
@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
def test_batch_fence_writes_find_their_rows_by_primary_key(
        conn: psycopg.Connection, leased: list[Any], name: str, plan_mode: str) -> None:
    conn.execute(f"SET plan_cache_mode = {plan_mode}")
    params = {"ids": [j.id for j in leased], "tokens": [j.lease_token for j in leased],
              "lease_ttl": 60.0, "results": None}
    plan = "\n".join(row[0] for row in conn.execute(
        "EXPLAIN (ANALYZE, COSTS OFF) " + queries()[name], params))
    conn.rollback()
    assert "Index Scan using pulse_jobs_pkey on pulse_jobs j" in plan, plan
    assert "Join Filter" not in plan and "Seq Scan on pulse_jobs" not in plan, plan
    # every lease matched (PostgreSQL 18 prints rows=100.00)
    assert re.search(rf"rows={BATCH}(\.0+)? loops=1", plan.splitlines()[0]), plan
