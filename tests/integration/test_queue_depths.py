"""Queue depths (status, /status.json, metrics) cost what the unfinished
jobs cost, not what the table holds, and the daemon's background readers
never take PostgreSQL's cores from the workers.

On a table of 6,000,000 rows (1,000,000 waiting) the old GROUP BY read every
finished row in a parallel scan: half a second of both cores, right when the
scheduler starts, in the middle of the workers' first claims."""

from __future__ import annotations

import re
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import pulsed
from pulsed.config import ApiConfig, Config
from pulsed.db.store import BACKGROUND_SESSION, Store, queries, session_options
from pulsed.http import ApiServer

REFERENCE = """SELECT type, state::text, count(*),
       EXTRACT(EPOCH FROM now() - min(CASE state WHEN 'available' THEN run_at
           WHEN 'running' THEN started_at ELSE created_at END))::float8
FROM pulse_jobs WHERE state IN ('scheduled', 'available', 'running', 'retryable', 'failed')
GROUP BY type, state ORDER BY type, state::text"""

FINISHED = 100_000  # enough that reading the table is never the cheap plan


def _insert(conn: psycopg.Connection, job_type: str, state: str, n: int) -> None:
    """n jobs in state, the g-th with every time g minutes ago."""
    running = state == "running"
    conn.execute(
        "INSERT INTO pulse_jobs (type, state, lease_owner, lease_token, lease_expires_at, "
        "                        run_at, created_at, started_at) "
        "SELECT %(type)s, %(state)s::pulse_job_state, %(owner)s, "
        "       CASE WHEN %(running)s THEN gen_random_uuid() END, "
        "       CASE WHEN %(running)s THEN now() + interval '1 hour' END, t, t, t "
        "FROM generate_series(1, %(n)s) g, LATERAL (SELECT now() - g * interval '1 min' AS t) c",
        {"type": job_type, "state": state, "owner": "w" if running else None,
         "running": running, "n": n})


def test_depths_count_every_unfinished_state_of_every_type(conn: psycopg.Connection) -> None:
    for job_type, state, n in [("zeta", "available", 3), ("alpha", "running", 2),
                               ("alpha", "failed", 4), ("alpha", "completed", 50),
                               ("mid", "cancelled", 5), ("mid", "scheduled", 1),
                               ("mid", "retryable", 6), ("alpha", "available", 1),
                               ("Beta", "available", 7)]:
        _insert(conn, job_type, state, n)
    conn.commit()
    reference = conn.execute(REFERENCE).fetchall()
    got = [(r["type"], r["state"], r["count"]) for r in Store(conn).queue_depths()]
    assert got == [tuple(r[:3]) for r in reference]
    ages = [(r["type"], r["state"], r["count"], round(r["oldest_age_s"]))
            for r in Store(conn).queue_ages()]
    assert ages == [(t, s, n, round(age)) for t, s, n, age in reference]
    assert ages[1] == ("alpha", "available", 1, 60) and ages[2][3] == 240  # 4 failed: 4 min
    assert got == [("Beta", "available", 7), ("alpha", "available", 1), ("alpha", "failed", 4),
                   ("alpha", "running", 2), ("mid", "retryable", 6), ("mid", "scheduled", 1),
                   ("zeta", "available", 3)]


def test_depths_of_an_empty_table(conn: psycopg.Connection) -> None:
    assert Store(conn).queue_depths() == [] and Store(conn).queue_ages() == []


def test_depths_read_partial_indexes_not_the_finished_rows(conn: psycopg.Connection) -> None:
    _insert(conn, "old", "completed", FINISHED)
    for state in ("available", "running", "scheduled", "retryable", "failed"):
        _insert(conn, "new", state, 10)
    conn.commit()
    conn.autocommit = True
    conn.execute("VACUUM ANALYZE pulse_jobs")
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + queries()["queue_ages"]))
    assert "Seq Scan on pulse_jobs" not in plan, plan
    # available jobs: either partial index of them by type (migration 0008's
    # type_aging_idx is the smaller one)
    for index in ("type_(available|aging)_idx", "lease_idx", "type_waiting_idx"):
        # an index scan or, on some samples of the statistics, a bitmap one
        assert re.search(rf"(using|Bitmap Index Scan on) pulse_jobs_{index}\b", plan), plan
    assert [r["count"] for r in Store(conn).queue_depths()] == [10] * 5


@pytest.mark.parametrize("dsn_options, pgoptions, expected", [
    (None, None, BACKGROUND_SESSION),
    ("-c search_path=app", None, f"-c search_path=app {BACKGROUND_SESSION}"),
    (None, "-c work_mem=8MB", f"-c work_mem=8MB {BACKGROUND_SESSION}"),
    ("-c search_path=app", "-c work_mem=8MB", f"-c search_path=app {BACKGROUND_SESSION}"),
])
def test_session_options_keep_what_the_dsn_gives(
        monkeypatch: pytest.MonkeyPatch, dsn_options: str | None, pgoptions: str | None,
        expected: str) -> None:
    if pgoptions is None:
        monkeypatch.delenv("PGOPTIONS", raising=False)
    else:
        monkeypatch.setenv("PGOPTIONS", pgoptions)
    for base in ("postgresql://u@127.0.0.1:5432/db", "host=/run/pg dbname=db"):
        dsn = make_conninfo(base, options=dsn_options) if dsn_options else base
        assert session_options(dsn, BACKGROUND_SESSION) == expected


@pytest.fixture
def api_pool(dsn: str) -> Iterator[psycopg.Connection]:
    config = Config(api=ApiConfig(enabled=True, listen="127.0.0.1:0"))
    server = ApiServer(config, make_conninfo(dsn, options="-c work_mem=5MB"))
    server.pool.open(wait=True)
    try:
        with server.pool.connection() as conn:
            yield conn
    finally:
        server.pool.close()


def test_the_api_reads_without_parallel_scans_or_jit(api_pool: psycopg.Connection) -> None:
    settings = {name: api_pool.execute(f"SHOW {name}").fetchone()[0]
                for name in ("max_parallel_workers_per_gather", "jit", "work_mem",
                             "statement_timeout")}
    assert settings["max_parallel_workers_per_gather"] == "0"
    assert settings["jit"] == "off"
    assert settings["work_mem"] == "5MB"  # the DSN's own options are kept
    assert settings["statement_timeout"] != "0"


def test_unhandled_types_are_the_waiting_ones_no_listed_worker_handles(
        conn: psycopg.Connection) -> None:
    store = Store(conn)
    for job_type, delay in (("a", None), ("a", None), ("b", 60.0), ("c", None)):
        pulsed.enqueue(conn, job_type, delay=delay)
    master = {"role": "master", "idx": 0, "pid": 1}
    store.worker_types_register("n1", 111, ["a"])
    store.worker_types_register("n2", 222, ["b"])  # its node's registry does not list it
    store.processes_heartbeat("n1", [master, {"role": "worker", "idx": 1, "pid": 111}])
    depths = store.queue_depths()
    assert store.unhandled_types(depths) == [{"type": "b", "count": 1},
                                             {"type": "c", "count": 1}]

    store.processes_heartbeat("n1", [master])  # worker 111 exited
    assert [u["type"] for u in store.unhandled_types(depths)] == ["a", "b", "c"]
    conn.execute("UPDATE pulse_worker_types SET registered_at = now() - interval '1 hour'")
    store.processes_heartbeat("n1", [master])  # unlisted past the grace: forgotten
    assert conn.execute("SELECT count(*) FROM pulse_worker_types").fetchone()[0] == 0
