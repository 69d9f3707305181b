"""The job browser's queries on a big table (issue 19): 5,000,000 finished
jobs plus 100,000 waiting ones, each page and count EXPLAIN ANALYZEd.

    python bench/console_browse.py postgresql://postgres@127.0.0.1:5432/repro

Builds the data set in the schema `console_bench` of the given database
(migrated there), prints each query's plan and time, and drops the schema
unless --keep."""

from __future__ import annotations

import argparse
import time

import psycopg

from pulsed.db.browse import JobFilter, count_query, error_params
from pulsed.db.migrate import migrate
from pulsed.db.store import queries

SCHEMA = "console_bench"
FINISHED, WAITING = 5_000_000, 100_000
NULL_FILTER = {"state": None, "type": None, "queue": None, "since": None, "until": None,
               "error_like": None, "error_text": None}


def build(conn: psycopg.Connection) -> None:
    t0 = time.monotonic()
    # Finished: 94% completed, 5% failed, 1% cancelled over 5 types and 3
    # queues, a week of history; then 100,000 waiting (available, some
    # scheduled and retryable) newer than all of them.
    conn.execute(f"""
        INSERT INTO pulse_jobs (type, queue, state, attempt, max_attempts, run_at, created_at,
                                started_at, finished_at, last_error, payload)
        SELECT 'type' || (g % 5), (ARRAY['default', 'mail', 'reports'])[1 + g % 3],
               (CASE WHEN g % 100 < 94 THEN 'completed' WHEN g % 100 < 99 THEN 'failed'
                     ELSE 'cancelled' END)::pulse_job_state,
               1, 3, t, t, t + interval '5 ms', t + interval '50 ms',
               CASE WHEN g % 100 BETWEEN 94 AND 98
                    THEN 'ConnectionError: smtp ' || (g % 977) || ' refused' END,
               jsonb_build_object('n', g)
        FROM (SELECT g, now() - interval '7 days' + g * interval '120 ms' AS t
              FROM generate_series(1, {FINISHED}) g) s""")
    conn.execute(f"""
        INSERT INTO pulse_jobs (type, queue, state, max_attempts, run_at, payload)
        SELECT 'type' || (g % 5), (ARRAY['default', 'mail', 'reports'])[1 + g % 3],
               (CASE WHEN g % 10 < 8 THEN 'available' WHEN g % 10 < 9 THEN 'scheduled'
                     ELSE 'retryable' END)::pulse_job_state, 3,
               now() + CASE WHEN g % 10 < 8 THEN interval '0' ELSE interval '1 hour' END,
               jsonb_build_object('n', g)
        FROM generate_series(1, {WAITING}) g""")
    conn.execute("VACUUM ANALYZE pulse_jobs")
    print(f"built {FINISHED + WAITING} jobs in {time.monotonic() - t0:.1f}s")


CASES = [
    ("newest page, no filter", {}),
    ("state=completed", {"state": "completed"}),
    ("state=failed", {"state": "failed"}),
    ("state=cancelled", {"state": "cancelled"}),
    ("state=available", {"state": "available"}),
    ("state=retryable", {"state": "retryable"}),
    ("state=failed type=type3", {"state": "failed", "type": "type3"}),
    ("state=failed queue=mail", {"state": "failed", "queue": "mail"}),
    ("type=type2", {"type": "type2"}),
    ("queue=reports", {"queue": "reports"}),
    # The error search (migration 0014's trigram index): a rare text (256
    # jobs), the same in any state, a text in every failed job, a longer
    # rare one in capitals, one matching none, and one too short for a
    # trigram (a substring test: browse.error_params).
    ("state=failed error~'smtp 12 '", {"state": "failed", **error_params("smtp 12 ")}),
    ("error~'smtp 12 '", error_params("smtp 12 ")),
    ("state=failed error~'refused'", {"state": "failed", **error_params("refused")}),
    ("error~'refused'", error_params("refused")),
    ("error~'SMTP 12 REFUSED'", error_params("SMTP 12 REFUSED")),
    ("error~'no_such%text'", error_params("no_such%text")),
    ("state=failed error~'12'", {"state": "failed", **error_params("12")}),
]
PLANS_SHOWN = ({}, {"state": "completed"}, {"state": "failed", "queue": "mail"},
               {"state": "failed", **error_params("smtp 12 ")},
               {"state": "failed", **error_params("refused")})
TRGM_INDEX = ("CREATE INDEX pulse_jobs_error_trgm_idx ON pulse_jobs "
              "USING gin (last_error gin_trgm_ops) WHERE last_error IS NOT NULL")


def explain(conn: psycopg.Connection, name: str, params: dict) -> tuple[float, str]:
    sql = "EXPLAIN (ANALYZE, BUFFERS) " + queries()[name]
    lines = [r[0] for r in conn.execute(sql, params, prepare=False)]
    total = next(float(l.split()[2]) for l in lines if l.startswith("Execution Time"))
    return total, "\n".join(lines)


def measure(conn: psycopg.Connection) -> None:
    conn.execute("SET max_parallel_workers_per_gather = 0")  # as the API's session
    conn.execute("SET jit = off")
    print("count: capped at 1,000 (browse.COUNT_CAP); times in ms, EXPLAIN ANALYZE")
    for label, given in CASES:
        params = {**NULL_FILTER, **given}
        # As pulsed.db.browse.list_page: a finished state's pages go by finish time.
        by_finish = given.get("state") in ("completed", "failed", "cancelled")
        name = "browse_list_finished" if by_finish else "browse_list"
        start = {"after": None, "after_at": None, "limit": 50}
        first, plan1 = explain(conn, name, {**params, **start})
        rows = conn.execute(queries()[name], {**params, **start}, prepare=False).fetchall()
        last = rows[-1] if rows else None
        cursor = {"after": last[0] if last else None,
                  "after_at": last[10] if last and by_finish else None, "limit": 50}
        nxt, _ = explain(conn, name, {**params, **cursor})
        counter = count_query(JobFilter(state=given.get("state"),  # as browse.count_capped
                                        error=given.get("error_like") or given.get("error_text")))
        count, plan3 = explain(conn, counter, {**params, "cap": 1001})
        print(f"{label:36} page1 {first:7.2f} ms   page2 {nxt:7.2f} ms   count {count:7.2f} ms")
        if given in PLANS_SHOWN:
            print("    " + plan1.replace("\n", "\n    "))
            print("    " + plan3.replace("\n", "\n    "))


def _rebuild_trgm_index(conn: psycopg.Connection) -> None:
    """Migration 0014's index, built on the full table: its upgrade cost.
    The extension was created in this schema by the migration (search_path)."""
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'").fetchone() is None:
        print("no pg_trgm on this server: the error search runs without its index")
        return
    t0 = time.monotonic()
    conn.execute(TRGM_INDEX)
    print(f"migration 0014's trigram index on {FINISHED + WAITING} rows: "
          f"{time.monotonic() - t0:.2f}s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    dsn = f"{args.dsn}?options=-csearch_path%3D{SCHEMA}"
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            if conn.execute("SELECT to_regclass('pulse_jobs')").fetchone()[0] is None:
                migrate(conn)
                # Rebuild the browse index after the data: its build time is the
                # upgrade's cost on a big table.
                conn.execute("DROP INDEX pulse_jobs_browse_idx")
                conn.execute("DROP INDEX IF EXISTS pulse_jobs_error_trgm_idx")
                build(conn)
                t0 = time.monotonic()
                conn.execute("CREATE INDEX pulse_jobs_browse_idx ON pulse_jobs (state, id) "
                             "WHERE state IN ('scheduled', 'retryable', 'failed', 'cancelled')")
                print(f"migration 0011's index on {FINISHED + WAITING} rows: "
                      f"{time.monotonic() - t0:.2f}s")
                _rebuild_trgm_index(conn)
                conn.execute("ANALYZE pulse_jobs")
            measure(conn)
    finally:
        if not args.keep:
            with psycopg.connect(args.dsn, autocommit=True) as admin:
                admin.execute(f"DROP SCHEMA {SCHEMA} CASCADE")


if __name__ == "__main__":
    main()
