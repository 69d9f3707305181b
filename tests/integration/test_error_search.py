"""The console's error-text search (issue 19): exactly the jobs whose last
error contains the text, any case, with %, _ and \\ standing for themselves;
and on a table big enough, read through migration 0014's trigram index."""

from __future__ import annotations

import psycopg
import pytest

from pulsed.db import browse
from pulsed.db.browse import JobFilter, error_params, error_pattern
from pulsed.db.store import Store, queries
from tests.integration.test_bulk_actions import jobs

ERRORS = {
    "pct": "ValueError: disk 100% full",
    "pct_other": "ValueError: disk 1000 full",  # '100% full' as a LIKE pattern matched this
    "under": "KeyError: 'user_id'",
    "under_other": "KeyError: 'userXid'",  # and 'user_id' this
    "slash": "OSError: C:\\temp\\x not found",
    "case": "SMTPError: Connection REFUSED",
    "none": None,
}


@pytest.fixture
def failed(conn: psycopg.Connection) -> dict[str, int]:
    """One failed job per error above, by name."""
    ids = {name: jobs(conn, 1, state="failed", error=text)[0] for name, text in ERRORS.items()}
    conn.commit()
    return ids


@pytest.mark.parametrize("text, expected", [
    ("100% full", {"pct"}),
    ("%", {"pct"}),
    ("user_id", {"under"}),
    ("_", {"under"}),
    ("\\temp\\", {"slash"}),
    ("\\", {"slash"}),
    ("connection refused", {"case"}),
    ("Error: ", {"pct", "pct_other", "under", "under_other", "slash", "case"}),
    ("nothing like it", set()),
])
def test_the_search_finds_exactly_the_jobs_whose_error_contains_the_text(
        conn: psycopg.Connection, failed: dict[str, int], text: str, expected: set[str]) -> None:
    store = Store(conn)
    want = {failed[name] for name in expected}
    for flt in (JobFilter(error=text), JobFilter(state="failed", error=text)):
        rows, _ = browse.list_page(store, flt, limit=50)
        assert {r["id"] for r in rows} == want, (flt, rows)
        assert browse.count_capped(store, flt) == (len(want), True)
        assert browse.bulk_count(store, "retry", flt) == len(want)


def test_a_bulk_action_by_error_text_changes_only_the_literal_matches(
        conn: psycopg.Connection, failed: dict[str, int]) -> None:
    result = browse.bulk_apply(Store(conn), "cancel", JobFilter(error="100%"), who="t")
    assert result.changed == 0  # failed jobs are not cancellable: nothing else changed
    result = browse.bulk_apply(Store(conn), "delete", JobFilter(error="user_id"), who="t")
    assert result.changed == 1
    left = {r[0] for r in conn.execute("SELECT id FROM pulse_jobs")}
    assert left == set(failed.values()) - {failed["under"]}


def test_the_pattern_escapes_the_wildcards_and_the_escape() -> None:
    assert error_pattern("a%b_c\\d") == "%a\\%b\\_c\\\\d%"
    assert error_pattern(None) is None
    # Without three letters or digits in a row there is no trigram to look up.
    assert error_params("ab%cd") == {"error_like": None, "error_text": "ab%cd"}
    assert error_params("user_id") == {"error_like": "%user\\_id%", "error_text": None}


def test_a_rare_error_is_searched_through_the_trigram_index(conn: psycopg.Connection) -> None:
    """50,000 failed jobs, 20 with the text searched for: the page and the
    count read the trigram index, not every failed row."""
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'").fetchone() is None:
        pytest.skip("no pg_trgm on this server: the search runs without its index")
    conn.execute("""
        INSERT INTO pulse_jobs (type, state, attempt, started_at, finished_at, last_error)
        SELECT 'plan', 'failed', 1, now(), now() - g * interval '1 ms',
               'TimeoutError: host ' || (g % 2500) || ' did not answer'
        FROM generate_series(1, 50000) g""")
    conn.commit()
    conn.execute("ANALYZE pulse_jobs")
    base = {"state": None, "type": None, "queue": None, "since": None, "until": None,
            **error_params("host 1234 did"), "after": None, "after_at": None,
            "limit": 50, "cap": 1001}
    failed = {**base, "state": "failed"}
    for name, params in (("browse_list", base), ("browse_count", base),
                         ("browse_list_finished", failed),
                         ("browse_count_error_finished", failed)):
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN (ANALYZE, COSTS OFF) " + queries()[name], params, prepare=False))
        assert "pulse_jobs_error_trgm_idx" in plan, (name, plan)
    flt = JobFilter(state="failed", error="HOST 1234 DID")
    rows, _ = browse.list_page(Store(conn), flt, limit=50)
    assert len(rows) == 20 and browse.count_capped(Store(conn), flt) == (20, True)


def test_without_pg_trgm_the_schema_migrates_and_the_search_still_works(
        admin_dsn: str) -> None:
    """A role that may not create the extension (no CREATE on the database):
    migration 0014 leaves the index out with a notice, and the search reads
    the rows instead."""
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    from pulsed.db.migrate import migrate
    from tests.pg import create_database, drop_database, unique_name
    name, role = unique_name("pulse_notrgm"), unique_name("pulse_plain")
    dsn = create_database(admin_dsn, name, template="template0")
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        admin.execute(sql.SQL("GRANT ALL ON SCHEMA public TO {}").format(sql.Identifier(role)))
    try:
        with psycopg.connect(make_conninfo(dsn, user=role), autocommit=True) as conn:
            notices: list[str] = []
            conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            assert 14 in migrate(conn)
            assert any("pg_trgm" in n for n in notices), notices
            assert conn.execute("SELECT to_regclass('pulse_jobs_error_trgm_idx')"
                                ).fetchone()[0] is None
            ids = jobs(conn, 2, state="failed", error="disk 100% full")
            jobs(conn, 1, state="failed", error="disk 1000 full")
            rows, _ = browse.list_page(Store(conn), JobFilter(error="100% FULL"))
            assert {r["id"] for r in rows} == set(ids)
    finally:
        drop_database(admin_dsn, name)
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.parametrize("text, count_query", [("pool_size 100%", "browse_count_error"),
                                               ("%", "browse_count")])
def test_a_waiting_states_search_counts_exactly_the_matches(conn: psycopg.Connection,
                                                           text: str, count_query: str) -> None:
    waiting = jobs(conn, 3, state="retryable", error="PoolError: pool_size 100% used")
    jobs(conn, 2, state="retryable", error="PoolError: poolXsize 1000 used")
    jobs(conn, 1, state="failed", error="PoolError: pool_size 100% used")
    flt = JobFilter(state="retryable", error=text)
    assert browse.count_query(flt) == count_query
    rows, _ = browse.list_page(Store(conn), flt)
    assert {r["id"] for r in rows} == set(waiting)
    assert browse.count_capped(Store(conn), flt) == (3, True)
