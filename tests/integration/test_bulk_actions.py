"""Bulk retry / cancel / delete by filter (issue 19), the console's reads
and the leader's stats rollup, against a real PostgreSQL: in the Store
layer (pulsed.db.browse), over HTTP with named tokens, and the rollup duty."""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest

import pulsed
from pulsed.config import ApiConfig, Config, parse_config
from pulsed.db import browse
from pulsed.db.browse import JobFilter
from pulsed.db.store import Store
from pulsed.errors import ConfigError
from pulsed.http import ApiServer
from pulsed.leadership import Leadership
from pulsed.maintenance.rollup import BUCKET_S, StatsRollup, bucket_start, rollup_size
from tests.integration.test_http_api import Client

ALICE, CI = "alice-secret-1", "ci-secret-2"


def jobs(conn: psycopg.Connection, count: int, job_type: str = "email", *,
         queue: str = "default", state: str | None = None, error: str | None = None) -> list[int]:
    """`count` new jobs, moved to `state` (finished ones with finished_at and the error)."""
    ids = [pulsed.enqueue(conn, job_type, {"n": i}, queue=queue) for i in range(count)]
    if state is not None:
        finished = state in ("completed", "failed", "cancelled")
        conn.execute("UPDATE pulse_jobs SET state = %s::pulse_job_state, attempt = 1, "
                     "started_at = CASE WHEN %s THEN now() END, "
                     "finished_at = CASE WHEN %s THEN now() END, last_error = %s "
                     "WHERE id = ANY(%s)", (state, finished, finished, error, ids))
    return ids


def states(conn: psycopg.Connection, ids: list[int]) -> dict[int, str]:
    rows = conn.execute("SELECT id, state::text FROM pulse_jobs WHERE id = ANY(%s)", (ids,))
    return dict(rows.fetchall())


# -- the Store layer ----------------------------------------------------------------


def test_bulk_cancel_changes_exactly_the_matching_jobs_in_batches(conn):
    matching = jobs(conn, 7, "email", queue="mail")
    other_type = jobs(conn, 3, "sms", queue="mail")
    other_queue = jobs(conn, 2, "email", queue="bulk")
    finished = jobs(conn, 2, "email", queue="mail", state="completed")
    flt = JobFilter(type="email", queue="mail")
    store = Store(conn)
    assert browse.bulk_count(store, "cancel", flt) == 7
    result = browse.bulk_apply(store, "cancel", flt, who="test", batch=3)
    assert (result.matched, result.changed, result.batches) == (7, 7, 3)
    assert set(states(conn, matching).values()) == {"cancelled"}
    assert set(states(conn, other_type + other_queue).values()) == {"available"}
    assert set(states(conn, finished).values()) == {"completed"}


def test_bulk_retry_runs_failed_jobs_again_and_keeps_a_completed_ones_attempt(conn):
    failed = jobs(conn, 4, "email", state="failed", error="SMTPError: refused")
    other_error = jobs(conn, 2, "email", state="failed", error="KeyError: 'to'")
    completed = jobs(conn, 1, "report", state="completed")
    store = Store(conn)
    result = browse.bulk_apply(store, "retry", JobFilter(state="failed", error="smtp"), who="t")
    assert result.changed == 4
    assert set(states(conn, failed).values()) == {"available"}
    assert set(states(conn, other_error).values()) == {"failed"}
    browse.bulk_apply(store, "retry", JobFilter(id=completed[0]), who="t")
    record = store.get_job(completed[0])
    assert record.state.value == "available"
    assert [a.outcome for a in record.attempts] == ["completed"]


def test_bulk_delete_by_state_and_age_leaves_running_and_newer_jobs(conn):
    old = jobs(conn, 5, "email", state="completed")
    conn.execute("UPDATE pulse_jobs SET finished_at = now() - interval '3 days' "
                 "WHERE id = ANY(%s)", (old,))
    recent = jobs(conn, 2, "email", state="completed")
    running = jobs(conn, 1, "email")
    conn.execute("UPDATE pulse_jobs SET state = 'running', lease_token = gen_random_uuid(), "
                 "lease_expires_at = now() + interval '1 minute', lease_owner = 'n/1' "
                 "WHERE id = %s", (running[0],))
    store = Store(conn)
    flt = JobFilter(state="completed", older_than=2 * 86400)
    assert browse.bulk_count(store, "delete", flt) == 5
    assert browse.bulk_apply(store, "delete", flt, who="t").changed == 5
    assert states(conn, old) == {}
    assert set(states(conn, recent).values()) == {"completed"}
    # A running job is never deleted: the filter's state rules it out.
    assert browse.bulk_count(store, "delete", JobFilter(state="running")) == 0
    assert browse.bulk_apply(store, "delete", JobFilter(id=running[0]), who="t").changed == 0
    assert states(conn, running) == {running[0]: "running"}


def test_a_job_locked_by_someone_else_is_skipped_not_waited_for(conn, dsn):
    ids = jobs(conn, 5, "email")
    with psycopg.connect(dsn) as holder:  # a worker in the middle of writing one job
        holder.execute("SELECT 1 FROM pulse_jobs WHERE id = %s FOR UPDATE", (ids[2],))
        conn.execute("SET lock_timeout = '2s'")  # were it to wait, it would fail
        started = time.monotonic()
        result = browse.bulk_apply(Store(conn), "cancel", JobFilter(type="email"), who="t")
        assert time.monotonic() - started < 1.5
        holder.rollback()
    assert (result.matched, result.changed, result.skipped) == (5, 4, 1)
    assert states(conn, ids)[ids[2]] == "available"


def test_the_browser_pages_by_keyset_and_counts_up_to_the_cap(conn):
    ids = jobs(conn, 12, "email", state="failed", error="Boom: x")
    jobs(conn, 5, "sms")
    store = Store(conn)
    flt = JobFilter(state="failed")
    # Failed jobs go by finish time, newest first (ties by id).
    conn.execute("UPDATE pulse_jobs SET finished_at = now() - make_interval(secs => id %% 4) "
                 "WHERE id = ANY(%s)", (ids,))
    expected = [r[0] for r in conn.execute(
        "SELECT id FROM pulse_jobs WHERE id = ANY(%s) ORDER BY finished_at DESC, id DESC",
        (ids,))]
    assert expected != sorted(ids, reverse=True)
    seen, after = [], None
    while True:
        page, after = browse.list_page(store, flt, after=after, limit=5)
        seen += [r["id"] for r in page]
        if after is None:
            break
    assert seen == expected
    waiting, after = browse.list_page(store, JobFilter(type="sms"), limit=3)
    rest, end = browse.list_page(store, JobFilter(type="sms"), after=after, limit=3)
    assert [r["id"] for r in waiting + rest] == sorted(
        [r["id"] for r in waiting + rest], reverse=True) and len(waiting + rest) == 5
    assert end is None
    assert browse.count_capped(store, flt) == (12, True)
    assert browse.count_capped(store, flt, cap=10) == (10, False)
    assert browse.count_capped(store, JobFilter(error="boom")) == (12, True)


# -- the leader's rollup -------------------------------------------------------------


def test_the_rollup_writes_each_bucket_once_and_stays_bounded(conn):
    store = Store(conn)
    leadership = Leadership("node-a/1", ttl=30)
    assert leadership.refresh(store)
    now = conn.execute("SELECT now()").fetchone()[0]
    ended = bucket_start(now) - timedelta(seconds=BUCKET_S)
    done = jobs(conn, 6, "email", state="completed")
    failed = jobs(conn, 2, "email", state="failed")
    jobs(conn, 3, "sms")  # waiting
    conn.execute("UPDATE pulse_jobs SET finished_at = %s + interval '1 s', "
                 "started_at = run_at + interval '2 s' WHERE id = ANY(%s)",
                 (ended, done + failed))
    rollup = StatsRollup()
    written = rollup.run_once(store, leadership)
    assert written >= 1
    total = conn.execute("SELECT completed, failed, waiting, pickup_p50_s FROM pulse_stats "
                         "WHERE bucket = %s AND queue = '*' AND type = '*'", (ended,)).fetchone()
    assert total[:3] == (6, 2, 3)
    assert total[3] == pytest.approx(2.0, abs=0.01)
    assert rollup.run_once(store, leadership) == 0  # nothing new ended yet
    # Old buckets are deleted: the table stays bounded.
    conn.execute("INSERT INTO pulse_stats (bucket, queue, type) VALUES (now() - interval '2 hours', '*', '*')")
    rollup._last = None
    conn.execute("DELETE FROM pulse_stats WHERE bucket = %s", (ended,))
    rollup.run_once(store, leadership)
    assert conn.execute("SELECT count(*) FROM pulse_stats WHERE bucket < now() - interval '1 hour 10 minutes'").fetchone()[0] == 0
    assert rollup_size(store)["rows"] > 0


def test_a_catch_up_writes_every_missed_bucket_in_one_statement(conn):
    """A new leader writes the buckets it missed (30 at a first start) in
    one statement: one per bucket scanned the waiting jobs 30 times, 2 s of
    a core in the middle of a 100,000-job drain. Each bucket still gets its
    own counts, per type and in total, and the waiting depth."""
    store = Store(conn)
    leadership = Leadership("node-a/1", ttl=30)
    assert leadership.refresh(store)
    now = conn.execute("SELECT now()").fetchone()[0]
    ended = bucket_start(now) - timedelta(seconds=BUCKET_S)
    in_bucket = {ended - timedelta(seconds=2 * BUCKET_S): 3, ended: 1}
    for bucket, count in in_bucket.items():
        ids = jobs(conn, count, "email", state="completed")
        conn.execute("UPDATE pulse_jobs SET finished_at = %s + interval '1 s' WHERE id = ANY(%s)",
                     (bucket, ids))
    sms = jobs(conn, 2, "sms", state="failed")
    conn.execute("UPDATE pulse_jobs SET finished_at = %s + interval '9.5 s' WHERE id = ANY(%s)",
                 (ended - timedelta(seconds=BUCKET_S), sms))
    jobs(conn, 4, "push")  # waiting
    rollups = []
    execute = conn.execute

    def counting(query: Any, *args: Any, **kwargs: Any) -> Any:
        if "INSERT INTO pulse_stats" in str(query):
            rollups.append(query)
        return execute(query, *args, **kwargs)

    conn.execute = counting  # type: ignore[method-assign]
    try:
        written = StatsRollup().run_once(store, leadership)
    finally:
        conn.execute = execute  # type: ignore[method-assign]
    assert len(rollups) == 1
    rows = conn.execute("SELECT bucket, queue, type, completed, failed, waiting FROM pulse_stats "
                        "WHERE bucket >= %s ORDER BY bucket, queue, type",
                        (ended - timedelta(seconds=2 * BUCKET_S),)).fetchall()
    assert written == conn.execute("SELECT count(*) FROM pulse_stats").fetchone()[0] > 0
    by_key = {(r[0], r[1], r[2]): r[3:] for r in rows}
    first, middle = ended - timedelta(seconds=2 * BUCKET_S), ended - timedelta(seconds=BUCKET_S)
    assert by_key[(first, "*", "*")] == (3, 0, 4)
    assert by_key[(first, "default", "email")] == (3, 0, 0)
    assert by_key[(middle, "*", "*")] == (0, 2, 4)
    assert by_key[(middle, "default", "sms")] == (0, 2, 0)
    assert by_key[(ended, "*", "*")] == (1, 0, 4)
    assert by_key[(ended, "default", "push")] == (0, 0, 4)
    # 30 buckets caught up (CATCH_UP_S), each with its total row
    assert conn.execute("SELECT count(*) FROM pulse_stats WHERE queue = '*'").fetchone()[0] == 31


def test_a_deposed_leader_writes_no_rollup(conn):
    store = Store(conn)
    stale = Leadership("node-b/1", ttl=30, term=99, trusted_until=time.monotonic() + 30)
    assert StatsRollup().run_once(store, stale) == 0
    assert conn.execute("SELECT count(*) FROM pulse_stats").fetchone()[0] == 0


# -- named tokens in the config ------------------------------------------------------


@pytest.mark.parametrize("tokens, words", [
    (["nocolon"], "name:secret"), (["a:"], "name:secret"), ([":x"], "name:secret"),
    (["a b:x"], "name:secret"), (["a:x", "a:y"], "given twice"), ("a:x", "list")])
def test_bad_named_tokens_are_refused_naming_the_setting(tokens, words):
    with pytest.raises(ConfigError) as caught:
        parse_config({"api": {"tokens": tokens}}, env={})
    assert "api.tokens" in str(caught.value) and words in str(caught.value)


def test_named_tokens_as_a_table():
    config = parse_config({"api": {"tokens": {"alice": "s:1", "ci": "s2"}}}, env={})
    assert config.api.tokens == (("alice", "s:1"), ("ci", "s2"))
    with pytest.raises(ConfigError, match="api.tokens"):
        parse_config({"api": {"tokens": {"alice": 5}}}, env={})


def test_named_tokens_from_the_environment():
    config = parse_config({}, env={"PULSE_API_TOKENS": "alice:s1,ci:s2"})
    assert config.api.tokens == (("alice", "s1"), ("ci", "s2"))


# -- over HTTP ---------------------------------------------------------------------------


def api_config(**api: Any) -> Config:
    return Config(api=ApiConfig(enabled=True, listen="127.0.0.1:0", **api))


@pytest.fixture
def named_server(dsn: str) -> Iterator[ApiServer]:
    config = api_config(tokens=(("alice", ALICE), ("ci", CI)))
    with ApiServer(config, dsn) as running:
        yield running


def test_actions_need_a_named_token_and_are_logged_with_its_name(named_server, conn, caplog):
    ids = jobs(conn, 3, "email", queue="mail")
    anonymous = Client(named_server.url)
    # Reads are open on loopback with named tokens only; actions are not.
    assert anonymous.get("/console/jobs.json?queue=mail").json["count"] == 3
    refused = anonymous.post("/jobs/bulk/cancel", {"queue": "mail"})
    assert refused.status == 401 and "token" in refused.error["message"]
    wrong = Client(named_server.url, token="guess").post("/jobs/bulk/cancel", {"queue": "mail"})
    assert wrong.status == 401
    assert set(states(conn, ids).values()) == {"available"}
    alice = Client(named_server.url, token=ALICE)
    dry = alice.post("/jobs/bulk/cancel", {"queue": "mail", "dry_run": True})
    assert dry.status == 200 and dry.json["matched"] == 3
    assert set(states(conn, ids).values()) == {"available"}
    with caplog.at_level(logging.INFO, logger="pulsed.db.browse"):
        done = alice.post("/jobs/bulk/cancel", {"queue": "mail"})
    assert done.status == 200, done.body
    assert (done.json["changed"], done.json["by"]) == (3, "alice")
    assert any("bulk cancel by alice: 3 jobs changed" in r.getMessage() for r in caplog.records)
    assert set(states(conn, ids).values()) == {"cancelled"}
    assert Client(named_server.url, token=CI).get("/console/whoami").json == {"name": "ci"}


@pytest.mark.parametrize("body, field", [
    ({}, None), ({"state": "bogus"}, "state"), ({"colour": "red"}, "colour"),
    ({"id": -1}, "id"), ({"older_than": "soon"}, "older_than"), ({"type": 5}, "type"),
    # past 100 years: "the database refused the request: timestamp out of range", no field
    ({"state": "failed", "older_than": 1e12}, "older_than"),
    ({"state": "failed", "dry_run": "yes"}, "dry_run")])
def test_bad_bulk_requests_are_400_naming_the_field(named_server, body, field):
    reply = Client(named_server.url, token=ALICE).post("/jobs/bulk/retry", body)
    assert reply.status == 400, reply.body
    assert reply.error["field"] == field


def test_without_any_token_configured_actions_are_refused(dsn, conn):
    ids = jobs(conn, 1, "email")
    with ApiServer(api_config(), dsn) as server:
        reply = Client(server.url).post("/jobs/bulk/cancel", {"id": ids[0]})
        assert reply.status == 401 and "[api] tokens" in reply.error["message"]
        # The page is served, read-only: the tables are rendered on the server.
        page = Client(server.url).get("/console")
        assert page.status == 200 and f'data-id="{ids[0]}"'.encode() in page.body
    assert states(conn, ids) == {ids[0]: "available"}


def test_with_api_token_set_reads_need_it_too(dsn, conn):
    jobs(conn, 1, "email")
    with ApiServer(api_config(token="legacy", tokens=(("ops", "named"),)), dsn) as server:
        assert Client(server.url).get("/console/jobs.json").status == 401
        assert Client(server.url, token="named").get("/console/jobs.json").status == 200
        page = Client(server.url).get("/console")  # public, but holds no job data
        assert page.status == 200 and b'data-id="' not in page.body
        who = Client(server.url, token="legacy").get("/console/whoami").json
        assert who == {"name": "api.token"}


def test_console_job_shows_attempts_and_the_lease_while_running(named_server, conn):
    (job_id,) = jobs(conn, 1, "email")
    conn.execute("UPDATE pulse_jobs SET state = 'running', attempt = 1, started_at = now(), "
                 "lease_token = gen_random_uuid(), lease_owner = 'node-a/42', "
                 "lease_expires_at = now() + interval '30 s' WHERE id = %s", (job_id,))
    job = Client(named_server.url).get(f"/console/jobs/{job_id}.json").json
    assert job["lease"]["lease_owner"] == "node-a/42" and job["lease"]["lease_expires_at"]
    assert Client(named_server.url).get("/console/jobs/999999.json").status == 404


def test_console_jobs_by_id_applies_the_other_filters_too(named_server, conn):
    # it listed job N whatever the state, type or error said, while its own
    # count (and the bulk action it previews) matched nothing
    (job_id,) = jobs(conn, 1, "email", state="failed", error="SMTP refused")
    client = Client(named_server.url)
    for query, listed in ((f"id={job_id}&state=failed&type=email&error=smtp", True),
                          (f"id={job_id}&state=completed", False),
                          (f"id={job_id}&type=other", False),
                          (f"id={job_id}&error=timeout", False),
                          (f"id={job_id}&queue=elsewhere", False)):
        page = client.get(f"/console/jobs.json?{query}").json
        assert ([j["id"] for j in page["jobs"]], page["count"]) == (
            ([job_id], 1) if listed else ([], 0)), query


def test_console_jobs_pages_with_the_cursor_it_gives(named_server, conn):
    ids = jobs(conn, 5, "email", state="completed")
    client = Client(named_server.url)
    first = client.get("/console/jobs.json?state=completed&limit=3").json
    assert first["count"] == 5 and len(first["jobs"]) == 3
    rest = client.get(f"/console/jobs.json?state=completed&limit=3&after={first['next_after']}")
    assert rest.status == 200 and rest.json["next_after"] is None
    assert sorted(j["id"] for j in first["jobs"] + rest.json["jobs"]) == ids
    for bad in ("x", "-3", "2026-13-01~5", "9999999999999999999~5", "~5"):
        reply = client.get(f"/console/jobs.json?after={bad}")
        assert reply.status == 400 and reply.error["field"] == "after"
    assert client.get("/console/jobs.json?state=nope").error["field"] == "state"


def test_queue_pause_and_resume_need_a_token(named_server, conn):
    assert Client(named_server.url).post("/queues/mail/pause").status == 401
    alice = Client(named_server.url, token=ALICE)
    assert alice.post("/queues/mail/pause").json == {"queue": "mail", "paused": True, "by": "alice"}
    assert Client(named_server.url).get("/console/cluster.json").json["paused_queues"] == ["mail"]
    assert alice.post("/queues/mail/resume").json["paused"] is False


@pytest.mark.parametrize("queue", ["eu west", "emails/eu", "café", "100%"])
def test_a_queue_named_in_the_path_is_percent_decoded(named_server, conn, queue):
    # the console sends encodeURIComponent(name); taken raw, "eu%20west" was
    # paused instead, a queue no job has
    alice = Client(named_server.url, token=ALICE)
    reply = alice.post(f"/queues/{urllib.parse.quote(queue, safe='')}/pause")
    assert reply.json == {"queue": queue, "paused": True, "by": "alice"}
    assert Client(named_server.url).get("/console/cluster.json").json["paused_queues"] == [queue]
    assert alice.post(f"/queues/{urllib.parse.quote(queue, safe='')}/resume").json["paused"] is False
    bad = alice.post("/queues/%FF%FE/pause")
    assert bad.status == 400 and bad.error["field"] == "queue"


def test_cluster_shows_a_silent_node_as_stopped(named_server, conn):
    conn.execute("INSERT INTO pulse_processes (node_id, role, idx, pid, heartbeat_at, info) "
                 "VALUES ('live', 'master', 0, 10, now(), '{\"state\": \"running\"}'), "
                 "('live', 'worker', 1, 12, now(), '{\"state\": \"busy\"}'), "
                 "('gone', 'master', 0, 11, now() - interval '5 minutes', '{}')")
    (job_id,) = jobs(conn, 1, "email")
    conn.execute("UPDATE pulse_jobs SET state = 'running', lease_token = gen_random_uuid(), "
                 "lease_owner = 'live/worker-1/12', lease_expires_at = now() + interval '1 m' "
                 "WHERE id = %s", (job_id,))
    nodes = {n["node_id"]: n for n in
             Client(named_server.url).get("/console/cluster.json").json["nodes"]}
    assert nodes["live"]["alive"] and not nodes["gone"]["alive"]
    master, worker = nodes["live"]["processes"]
    assert (master["state"], worker["state"], worker["running"]) == ("running", "busy", 1)
