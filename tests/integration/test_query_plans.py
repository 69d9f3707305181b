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
from pulsed.db.store_worker import ClaimTerms

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


@pytest.fixture
def unhandled_first(conn: psycopg.Connection) -> None:
    """A backlog of jobs nobody handles, ahead of the handled ones both by
    priority and by age (overdue), planned on fresh statistics."""
    conn.execute("INSERT INTO pulse_jobs (type, state, priority, run_at) "
                 "SELECT 'orphan', 'available', -1, now() - interval '1 day' "
                 "FROM generate_series(1, %s)", (BACKLOG,))
    conn.execute("INSERT INTO pulse_jobs (type, state, run_at) "
                 "SELECT t, 'available', now() - make_interval(secs => i) "
                 "FROM generate_series(1, %s) i, unnest('{a,b}'::text[]) t", (BATCH * 2,))
    conn.commit()
    conn.execute("ANALYZE pulse_jobs")
    conn.commit()


def _claim_plan(conn: psycopg.Connection, name: str, handled: list[str] | None,
                plan_mode: str = "force_custom_plan") -> str:
    """The claim's plan as a worker runs it: its text with the worker's
    terms written in, the limit a parameter, in a transaction with the
    claim's plan settings (rolled back, claiming nothing). A worker's
    claims are prepared: after five, the server may keep a generic plan."""
    terms = ClaimTerms(owner="w", lease_ttl=30.0, aging=60.0,
                       handled=None if handled is None else tuple(handled))
    with conn.transaction(force_rollback=True):
        conn.execute(f"SET LOCAL plan_cache_mode = {plan_mode}")
        conn.execute(queries()["claim_plan_settings"])
        return "\n".join(row[0] for row in conn.execute(
            "EXPLAIN (ANALYZE, COSTS OFF) " + Store(conn).claim_texts(terms).text(name),
            {"limit": BATCH}))


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("handled", [None, ["orphan", "a", "b"]])
def test_the_claim_is_an_ordered_index_scan_that_stops_after_its_batch(
        conn: psycopg.Connection, unhandled_first: None, handled: list[str] | None,
        plan_mode: str) -> None:
    plan = _claim_plan(conn, "job_claim", handled, plan_mode)
    assert "Seq Scan on pulse_jobs" not in plan and "Sort" not in plan, plan
    assert "Index Scan using pulse_jobs_aging_idx" in plan, plan
    assert re.search(rf"rows={BATCH}(\.0+)? loops=1", plan.splitlines()[0]), plan
    assert "Rows Removed by Filter" not in plan, plan


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
def test_claiming_by_type_never_walks_the_jobs_of_other_types(
        conn: psycopg.Connection, unhandled_first: None, plan_mode: str) -> None:
    """job_claim's walk past BACKLOG jobs nobody handles is what this claim
    avoids: one ordered scan per handled type, each stopping at the batch."""
    walk = _claim_plan(conn, "job_claim", ["a", "b"], plan_mode)
    assert re.search(rf"Rows Removed by Filter: {BACKLOG}\b", walk), walk

    plan = _claim_plan(conn, "job_claim_by_type", ["a", "b"], plan_mode)
    assert "Seq Scan on pulse_jobs" not in plan, plan
    assert "Index Scan using pulse_jobs_type_aging_idx" in plan, plan
    assert re.search(rf"rows={BATCH}(\.0+)? loops=1", plan.splitlines()[0]), plan
    assert "Rows Removed by Filter" not in plan, plan
    # each type's scan stops after the batch: BATCH rows a loop, one loop a type
    assert re.search(rf"Index Scan using pulse_jobs_type_aging_idx .*rows={BATCH}(\.0+)? loops=2",
                     plan), plan


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("name", ["job_claim", "job_claim_by_type"])
def test_the_claim_reads_the_paused_queues_by_an_index_only_scan(
        conn: psycopg.Connection, name: str, plan_mode: str) -> None:
    """Every claim reads the paused queues (a table nobody analyzes, empty
    but for a pause). With the claim's settings (no sequential scans) an
    unordered read was a bitmap heap scan, ~50 us more to set up, twice a
    claim: a fifth of a one-job claim's execution."""
    conn.execute("INSERT INTO pulse_jobs (type, state) VALUES ('a', 'available')")
    conn.commit()
    plan = _claim_plan(conn, name, ["a"] if name == "job_claim_by_type" else None, plan_mode)
    assert "Bitmap Heap Scan on pulse_paused_queues" not in plan, plan
    assert "Index Only Scan using pulse_paused_queues_pkey" in plan, plan


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
def test_completing_and_claiming_reads_the_paused_queues_by_an_index_only_scan(
        conn: psycopg.Connection, plan_mode: str) -> None:
    """The same for the statement a worker at concurrency 1 sends after each
    job: its completions, then its claim."""
    conn.execute("INSERT INTO pulse_jobs (type, state) VALUES ('a', 'available')")
    conn.commit()
    terms = ClaimTerms(owner="w", lease_ttl=30.0, aging=60.0)
    with conn.transaction(force_rollback=True):
        conn.execute(f"SET LOCAL plan_cache_mode = {plan_mode}")
        conn.execute(queries()["claim_plan_settings"])
        plan = "\n".join(row[0] for row in conn.execute(
            "EXPLAIN (ANALYZE, COSTS OFF) "
            + Store(conn).claim_texts(terms).text("job_complete_and_claim"),
            {"limit": 1, "ids": [0], "tokens": ["00000000-0000-0000-0000-000000000000"],
             "results": [None]}))
    assert "Bitmap Heap Scan on pulse_paused_queues" not in plan, plan
    assert plan.count("Index Only Scan using pulse_paused_queues_pkey") == 2, plan


def test_a_single_enqueue_is_one_insert_without_common_table_expressions(
        conn: psycopg.Connection) -> None:
    """job_insert as CTEs (its run_at, the insert, its NOTIFY) took ~120 us to
    execute against ~70 us for the one Insert it is now: the first step of
    every single-job enqueue (W2's latency starts there)."""
    params = {"run_at": None, "delay": 0.0, "type": "t", "queue": "default",
              "payload": "{}", "priority": 0, "max_attempts": None, "idempotency_key": None,
              "timeout": None, "unique_while": None, "unique_for": None, "trace_context": None}
    with conn.transaction(force_rollback=True):
        plan = "\n".join(row[0] for row in conn.execute(
            "EXPLAIN (ANALYZE, COSTS OFF) " + queries()["job_insert"], params))
    assert plan.startswith("Insert on pulse_jobs"), plan
    assert "CTE" not in plan and "SubPlan" not in plan and "InitPlan" not in plan, plan
    assert re.search(r"rows=1(\.0+)? loops=1", plan.splitlines()[0]), plan
