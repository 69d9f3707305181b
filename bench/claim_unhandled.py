"""The claim's time with many waiting jobs of types the worker does not
handle ahead of the ones it does (issue 24 item 7): job_claim (a per-row
type filter on the claim index) beside job_claim_by_type (one index scan
per handled type). Each claim is rolled back, so every one sees the same
backlog.

    python bench/claim_unhandled.py DSN [--unhandled 1000000] [--claims 20]

DSN names a database this script may empty (it migrates it first)."""

from __future__ import annotations

import argparse
import statistics
import time

import psycopg

from pulsed.db.migrate import migrate
from pulsed.db.store import CLAIM_SESSION, Store, session_options

HANDLED = ("email", "report")
HANDLED_JOBS = 10_000
BATCH = 100  # a claim's size in the W1 drain
AGING = 60.0  # [worker] aging's default


def fill(conn: psycopg.Connection, unhandled: int) -> None:
    """`unhandled` jobs of 10 types nobody handles, first by priority and by
    age, then HANDLED_JOBS of the handled types."""
    conn.execute("TRUNCATE pulse_jobs CASCADE")
    conn.execute("INSERT INTO pulse_jobs (type, state, priority, run_at) "
                 "SELECT 'orphan-' || (i %% 10), 'available', -1, now() - interval '1 day' "
                 "FROM generate_series(1, %s) i", (unhandled,))
    conn.execute("INSERT INTO pulse_jobs (type, state, priority, run_at) "
                 "SELECT (%s::text[])[1 + i %% 2], 'available', 0, now() - interval '1 hour' "
                 "FROM generate_series(1, %s) i", (list(HANDLED), HANDLED_JOBS))
    conn.commit()
    conn.execute("VACUUM ANALYZE pulse_jobs")


def time_claims(conn: psycopg.Connection, claims: int, **options: object) -> list[float]:
    store, took = Store(conn), []
    for _ in range(claims):
        start = time.perf_counter()
        jobs = store.claim(owner="bench", limit=BATCH, lease_ttl=30, aging=AGING,
                           **options)  # type: ignore[arg-type]
        took.append(time.perf_counter() - start)
        assert len(jobs) == BATCH and {j.type for j in jobs} <= set(HANDLED), jobs[:3]
        conn.rollback()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dsn")
    parser.add_argument("--unhandled", type=int, default=1_000_000)
    parser.add_argument("--claims", type=int, default=20)
    args = parser.parse_args()
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        migrate(admin)
        fill(admin, args.unhandled)
    options = session_options(args.dsn, CLAIM_SESSION)
    with psycopg.connect(args.dsn, options=options) as conn:
        for name, by_type in (("job_claim", False), ("job_claim_by_type", True)):
            took = time_claims(conn, args.claims, handled=list(HANDLED), by_type=by_type)
            print(f"{name}: {args.unhandled:,} unhandled jobs ahead, {BATCH} a claim: "
                  f"median {statistics.median(took) * 1000:.2f} ms, "
                  f"min {min(took) * 1000:.2f}, max {max(took) * 1000:.2f} ({args.claims} claims)")


if __name__ == "__main__":
    main()
