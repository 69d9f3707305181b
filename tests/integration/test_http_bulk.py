"""POST /jobs with a JSON array, and the enqueue group that commits
concurrent single-job requests together (pulsed/http/enqueue_group.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

from pulsed.api import job_params
from pulsed.config import TypeConfig
from pulsed.http import ApiServer
from pulsed.http.endpoints import BULK_CHUNK, MAX_BULK_JOBS
from pulsed.http import enqueue_group
from pulsed.http.enqueue_group import EnqueueGroup
from pulsed.http.messages import HttpError
from tests.integration.test_http_api import Client, make_config


@pytest.fixture
def server(dsn: str) -> Iterator[ApiServer]:
    with ApiServer(make_config(types={"report": TypeConfig(priority=7, max_attempts=3)}),
                   dsn) as running:
        yield running


@pytest.fixture
def client(server: ApiServer) -> Client:
    return Client(server.url)


def count_jobs(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pulse_jobs").fetchone()[0]


# -- the array form ----------------------------------------------------------------------


def test_an_array_inserts_every_job_in_order_and_answers_each(client, conn):
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    reply = client.post("/jobs", json.dumps([
        {"type": "email", "payload": {"n": 0}},
        {"type": "report"},  # the type's defaults apply, as for one job
        {"type": "email", "run_at": later, "queue": "slow"},
    ]))
    assert reply.status == 201, reply.body
    jobs = reply.json
    assert [job["state"] for job in jobs] == ["available", "available", "scheduled"]
    assert all(job["created"] for job in jobs) and set(jobs[0]) == {"id", "state", "created"}
    rows = conn.execute("SELECT id, type, queue, payload, priority, max_attempts FROM pulse_jobs "
                        "ORDER BY id").fetchall()
    assert [row[0] for row in rows] == [job["id"] for job in jobs]
    assert rows[0][1:4] == ("email", "default", {"n": 0})
    assert rows[1][4:] == (7, 3)
    assert rows[2][2] == "slow"


@pytest.mark.parametrize("items, field, words", [
    ([{"type": "email"}, {"type": "email"}, {"type": "email", "priority": "high"}],
     "jobs[2].priority", "jobs[2].priority must be an integer"),
    ([{"type": "email"}, "email"], "jobs[1]", "jobs[1] must be a JSON object, got a string"),
    ([{"type": "email", "colour": "red"}], "jobs[0].colour", "jobs[0]: unknown field 'colour'"),
    ([{"type": "email"}, {"priority": 1}], "jobs[1].type", "jobs[1].type is required"),
    ([{"type": "email", "payload": [1]}], "jobs[0].payload", "jobs[0].payload must be a JSON "
                                                             "object"),
])
def test_one_bad_item_is_400_naming_it_and_nothing_is_inserted(client, conn, items, field,
                                                               words):
    reply = client.post("/jobs", json.dumps(items))
    assert reply.status == 400, reply.body
    assert (reply.error["code"], reply.error["field"]) == ("invalid_argument", field)
    assert reply.error["message"].startswith(words), reply.error["message"]
    assert count_jobs(conn) == 0


def test_an_array_over_several_chunks_goes_in_whole_and_in_order(client, conn):
    """An array is checked and sent BULK_CHUNK jobs at a time (the database
    inserts one chunk while the next is checked): one transaction still,
    the answers in input order."""
    count = BULK_CHUNK * 2 + 50
    reply = client.post("/jobs", json.dumps([{"type": "email", "payload": {"n": n}}
                                             for n in range(count)]))
    assert reply.status == 201, reply.body
    ids = [job["id"] for job in reply.json]
    assert all(job["created"] for job in reply.json) and ids == sorted(ids)
    rows = conn.execute("SELECT id, payload->>'n', xmin::text FROM pulse_jobs ORDER BY id")
    rows = rows.fetchall()
    assert [row[0] for row in rows] == ids
    assert [int(row[1]) for row in rows] == list(range(count))
    assert len({row[2] for row in rows}) == 1  # one transaction


def test_a_bad_item_in_a_later_chunk_leaves_nothing_of_the_chunks_sent(client, conn):
    """The first chunks were sent to the database before a later one was
    checked: the 400 rolls them back, and the connection serves the next
    request."""
    items = [{"type": "email"} for _ in range(BULK_CHUNK * 2 + 50)]
    items[BULK_CHUNK * 2 + 10] = {"type": "email", "priority": "high"}
    reply = client.post("/jobs", json.dumps(items))
    assert reply.status == 400, reply.body
    assert reply.error["field"] == f"jobs[{BULK_CHUNK * 2 + 10}].priority"
    assert count_jobs(conn) == 0
    again = client.post("/jobs", json.dumps([{"type": "email"}] * (BULK_CHUNK + 1)))
    assert again.status == 201 and count_jobs(conn) == BULK_CHUNK + 1


def test_a_value_the_database_refuses_in_a_later_chunk_inserts_nothing(client, conn):
    """A refusal by the database itself (here a trigger's, as a value it
    rejects) in the third chunk: 400, and the two chunks before it are
    rolled back with it."""
    conn.execute("CREATE FUNCTION pulse_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                 "$$ BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = '22023'; END $$")
    conn.execute("CREATE TRIGGER pulse_test_refuse BEFORE INSERT ON pulse_jobs FOR EACH ROW "
                 "WHEN (NEW.type = 'refused') EXECUTE FUNCTION pulse_test_refuse()")
    items = [{"type": "email"} for _ in range(BULK_CHUNK * 2 + 50)]
    items[-1] = {"type": "refused"}
    try:
        reply = client.post("/jobs", json.dumps(items))
    finally:
        conn.execute("DROP TRIGGER pulse_test_refuse ON pulse_jobs")
        conn.execute("DROP FUNCTION pulse_test_refuse()")
    assert reply.status == 400 and "refused" in reply.error["message"], reply.body
    assert count_jobs(conn) == 0
    assert client.post("/jobs", json.dumps([{"type": "email"}] * 3)).status == 201


def test_a_refusal_in_an_early_chunk_wins_over_a_bad_item_in_a_later_one(client, conn,
                                                                         caplog):
    """The database refuses an item of the first chunk (known only when the
    pipeline ends) and the third chunk has a bad item: the 400 names the
    first problem, and psycopg logs no "error ignored" warning (any client
    could write that line into the daemon's log)."""
    conn.execute("CREATE FUNCTION pulse_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                 "$$ BEGIN RAISE EXCEPTION 'refused early' USING ERRCODE = '22023'; END $$")
    conn.execute("CREATE TRIGGER pulse_test_refuse BEFORE INSERT ON pulse_jobs FOR EACH ROW "
                 "WHEN (NEW.type = 'refused') EXECUTE FUNCTION pulse_test_refuse()")
    items = [{"type": "email"} for _ in range(BULK_CHUNK * 2 + 50)]
    items[5] = {"type": "refused"}
    items[BULK_CHUNK * 2 + 10] = {"type": "email", "priority": "high"}
    try:
        with caplog.at_level(logging.WARNING, logger="psycopg"):
            reply = client.post("/jobs", json.dumps(items))
    finally:
        conn.execute("DROP TRIGGER pulse_test_refuse ON pulse_jobs")
        conn.execute("DROP FUNCTION pulse_test_refuse()")
    assert reply.status == 400 and "refused early" in reply.error["message"], reply.body
    assert not [r for r in caplog.records if r.name.startswith("psycopg")]
    assert count_jobs(conn) == 0


def test_an_empty_array_is_201_and_inserts_nothing(client, conn):
    reply = client.post("/jobs", "[]")
    assert (reply.status, reply.json) == (201, [])
    assert count_jobs(conn) == 0


def test_idempotency_keys_in_an_array_give_the_holder(client, conn):
    held = client.post("/jobs", {"type": "email", "idempotency_key": "k-held"}).json["id"]
    reply = client.post("/jobs", json.dumps([
        {"type": "email", "idempotency_key": "k-held"},
        {"type": "email", "idempotency_key": "k-new"},
        {"type": "email", "idempotency_key": "k-new"},  # twice in one array: the first's job
        {"type": "email"},
    ]))
    assert reply.status == 201, reply.body
    jobs = reply.json
    assert [job["created"] for job in jobs] == [False, True, False, True]
    assert jobs[0]["id"] == held and jobs[1]["id"] == jobs[2]["id"]
    assert count_jobs(conn) == 3


def test_an_array_over_the_job_limit_is_413_naming_it(client, conn):
    reply = client.post("/jobs", json.dumps([{"type": "e"}] * (MAX_BULK_JOBS + 1)))
    assert (reply.status, reply.error["code"]) == (413, "payload_too_large")
    assert f"the limit is {MAX_BULK_JOBS} per request" in reply.error["message"]
    assert count_jobs(conn) == 0


def test_a_body_over_the_array_limit_is_413_before_it_is_read(dsn, conn):
    with ApiServer(make_config(), dsn, max_body=2048, max_bulk_body=4096) as small:
        items = json.dumps([{"type": "email", "payload": {"n": n}} for n in range(200)])
        reply = Client(small.url).post("/jobs", items)
        assert (reply.status, reply.error["code"]) == (413, "payload_too_large")
        assert "the limit is 4096 (an array of jobs)" in reply.error["message"]
        # one job's body has the lower limit, though it may arrive as an array's would
        one = json.dumps({"type": "email", "payload": {"x": "a" * 3000}})
        single = Client(small.url).post("/jobs", one)
        assert single.status == 413 and "the limit for one job is 2048" in \
            single.error["message"]
        # other endpoints keep max_body
        other = Client(small.url).post("/jobs/1/cancel", "{" + " " * 3000 + "}")
        assert other.status == 413 and "the limit is 2048" in other.error["message"]
    assert count_jobs(conn) == 0


def test_an_array_needs_the_token_when_one_is_set(dsn, conn):
    with ApiServer(make_config(token="s3cret"), dsn) as guarded:
        refused = Client(guarded.url).post("/jobs", '[{"type": "email"}]')
        assert (refused.status, refused.error["code"]) == (401, "unauthorized")
        assert count_jobs(conn) == 0
        taken = Client(guarded.url, token="s3cret").post("/jobs", '[{"type": "email"}]')
        assert taken.status == 201 and count_jobs(conn) == 1


# -- single jobs, grouped ----------------------------------------------------------------


def test_the_answer_to_one_job_is_the_job_as_stored(client):
    later = (datetime.now(timezone.utc) + timedelta(minutes=5)).replace(microsecond=0)
    reply = client.post("/jobs", {"type": "report", "payload": {"b": [1, {"c": None}], "a": "é"},
                                  "run_at": later.isoformat(), "idempotency_key": "k1",
                                  "unique_for": 60, "queue": "q", "timeout": 9})
    assert reply.status == 201, reply.body
    stored = client.get(f"/jobs/{reply.json['id']}").json
    stored.pop("attempts")
    assert reply.json == stored


def test_concurrent_requests_each_get_their_own_committed_job(client, dsn):
    def submit(n: int) -> tuple[int, dict[str, Any], bool]:
        reply = client.post("/jobs", {"type": "email", "payload": {"n": n}})
        # a 201 comes after the commit: another connection sees the job now
        with psycopg.connect(dsn) as other:
            seen = other.execute("SELECT payload FROM pulse_jobs WHERE id = %s",
                                 (reply.json["id"],)).fetchone()
        return reply.status, reply.json, seen == ({"n": n},)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(submit, range(96)))
    assert all(status == 201 and seen for status, _, seen in results)
    assert [job["payload"]["n"] for _, job, _ in results] == list(range(96))
    assert len({job["id"] for _, job, _ in results}) == 96


def test_concurrent_requests_with_one_key_get_one_job(client, conn):
    body = {"type": "email", "idempotency_key": "once"}
    with ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(lambda _: client.post("/jobs", body), range(24)))
    assert sorted(r.status for r in replies) == [200] * 23 + [201]
    assert len({r.json["id"] for r in replies}) == 1
    assert count_jobs(conn) == 1


@contextmanager
def group_on_loop(dsn: str, connect_async: Callable[[], Awaitable[psycopg.AsyncConnection]]
                  ) -> Iterator[EnqueueGroup]:
    """An EnqueueGroup on an event loop of its own thread, as the API runs
    it. Closed (what waits committed) at the end."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    group = EnqueueGroup(loop, connect_async)
    try:
        yield group
    finally:
        asyncio.run_coroutine_threadsafe(group.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextmanager
def held_group(dsn: str) -> Iterator[tuple[EnqueueGroup, threading.Event, threading.Event]]:
    """An EnqueueGroup whose first connection waits for `release`, so the
    enqueues made meanwhile queue up and go as one group."""
    first, release = threading.Event(), threading.Event()

    async def connect() -> psycopg.AsyncConnection:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        if not first.is_set():
            first.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
        return conn

    with group_on_loop(dsn, connect) as group:
        try:
            yield group, first, release
        finally:
            release.set()


def _enqueue_all(group: EnqueueGroup, batch: list[dict[str, Any]], first: threading.Event,
                 release: threading.Event) -> list[Any]:
    """Enqueue the first item alone, the rest while it waits; each's outcome."""
    with ThreadPoolExecutor(len(batch)) as pool:
        futures = [pool.submit(group.enqueue, batch[0])]
        assert first.wait(10)
        futures += [pool.submit(group.enqueue, params) for params in batch[1:]]
        deadline = time.monotonic() + 10
        while len(group._pending) < len(batch) - 1:  # all queued behind the first
            assert time.monotonic() < deadline, "the enqueues did not queue up"
            threading.Event().wait(0.001)
        release.set()
        return [f.exception() or f.result() for f in futures]


def test_waiting_enqueues_share_one_transaction(dsn, conn):
    batch = [job_params(type="email", payload={"n": n}) for n in range(10)]
    with held_group(dsn) as (group, first, release):
        outcomes = _enqueue_all(group, batch, first, release)
    assert [o.record.payload["n"] for o in outcomes] == list(range(10))
    transactions = conn.execute("SELECT count(DISTINCT xmin::text) FROM pulse_jobs").fetchone()
    assert transactions == (2,)  # the first alone, the nine that waited together


def test_a_job_the_database_refuses_fails_alone_in_its_group(dsn, conn):
    batch = [job_params(type="email", payload={"n": n}) for n in range(6)]
    batch[3] = dict(batch[3], payload="{not json")  # past the checks, refused by jsonb
    with held_group(dsn) as (group, first, release):
        outcomes = _enqueue_all(group, batch, first, release)
    assert isinstance(outcomes[3], psycopg.DataError)
    good = [o for n, o in enumerate(outcomes) if n != 3]
    assert [o.record.payload["n"] for o in good] == [0, 1, 2, 4, 5]
    ids = sorted(r[0] for r in conn.execute("SELECT id FROM pulse_jobs"))
    assert ids == sorted(o.inserted.id for o in good)


@contextmanager
def counted_group(dsn: str) -> Iterator[tuple[EnqueueGroup, list[int]]]:
    """An EnqueueGroup; the backend pid of each connection it opens."""
    taken: list[int] = []

    async def connect() -> psycopg.AsyncConnection:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        taken.append(conn.info.backend_pid)
        return conn

    with group_on_loop(dsn, connect) as group:
        yield group, taken


def test_an_idle_group_keeps_its_connection_for_the_next_group(dsn):
    """A pool checks a connection it hands out (a round trip); the group
    keeps its own between groups."""
    with counted_group(dsn) as (group, taken):
        for n in range(3):
            assert group.enqueue(job_params(type="email", payload={"n": n}), timeout=10)
            time.sleep(0.05)  # idle between requests, well within the hold
        assert len(taken) == 1


def test_a_held_connection_the_server_closed_is_replaced_not_failed(dsn, conn):
    """Killed while the group held it idle: the next group goes on a new
    connection instead of failing with the dead one."""
    with counted_group(dsn) as (group, taken):
        first = group.enqueue(job_params(type="email", payload={"n": 1}), timeout=10)
        conn.execute("SELECT pg_terminate_backend(%s)", (taken[0],))
        deadline = time.monotonic() + 10
        while conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                           (taken[0],)).fetchone():
            assert time.monotonic() < deadline, "the backend did not end"
            threading.Event().wait(0.01)
        second = group.enqueue(job_params(type="email", payload={"n": 2}), timeout=10)
        assert second.inserted.created and second.inserted.id != first.inserted.id
        assert len(taken) == 2 and taken[1] != taken[0]
    assert count_jobs(conn) == 2


def _enqueued_total(client: Client, job_type: str) -> float:
    text = client.get("/metrics").body.decode()
    line = f'pulse_jobs_enqueued_total{{source="http",type="{job_type}"}} '
    return next((float(row[len(line):]) for row in text.splitlines() if row.startswith(line)), 0.0)


def test_enqueued_jobs_are_counted_by_type_once_each(client):
    """Counted per type per array (and per group for single jobs), each
    created job once; an idempotent repeat is not counted again."""
    before = {t: _enqueued_total(client, t) for t in ("count-a", "count-b")}
    items = [{"type": "count-a"}] * 3 + [{"type": "count-b"}] * 2 + [
        {"type": "count-b", "idempotency_key": "count-b-once"}] * 2
    assert client.post("/jobs", json.dumps(items)).status == 201
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: client.post("/jobs", {"type": "count-a"}), range(4)))
    assert [r.status for r in replies] == [201] * 4
    again = client.post("/jobs", {"type": "count-b", "idempotency_key": "count-b-once"})
    assert again.status == 200
    after = {t: _enqueued_total(client, t) for t in ("count-a", "count-b")}
    assert (after["count-a"] - before["count-a"], after["count-b"] - before["count-b"]) == (7, 3)


def test_a_held_connection_past_descriptor_1023_keeps_the_group_alive(dsn, conn):
    """An application embedding the API with many files open: the check of a
    held connection used select(), which refuses descriptors past 1023; the
    group died with the group in hand and every later enqueue hung."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with counted_group(dsn) as (group, taken):
            for n in range(3):  # the second and third come within the hold
                assert group.enqueue(job_params(type="email", payload={"n": n}), timeout=10)
            assert group.running() and len(taken) == 1
    finally:
        for fd in filler:
            os.close(fd)
    assert count_jobs(conn) == 3


def test_a_group_with_held_keys_answers_each_with_the_holder(dsn, conn):
    """A group carrying idempotency keys runs in one transaction: a key given
    twice in the group, and a key held from before, each get the holder's
    job (created False), the keyless items their own."""
    holder = job_params(type="email", idempotency_key="held")
    batch = [job_params(type="email", payload={"n": 0}),
             job_params(type="email", idempotency_key="twice"),
             job_params(type="email", idempotency_key="twice"),
             job_params(type="email", idempotency_key="held"),
             job_params(type="email", payload={"n": 4})]
    with counted_group(dsn) as (group, _):
        before = group.enqueue(holder, timeout=10)
    with held_group(dsn) as (group, first, release):
        outcomes = _enqueue_all(group, [job_params(type="email")] + batch, first, release)
    first_done, zero, twice_a, twice_b, held, four = outcomes
    assert [o.inserted.created for o in outcomes] == [True, True, True, False, False, True]
    assert twice_a.inserted.id == twice_b.inserted.id
    assert held.inserted.id == before.inserted.id and held.record.idempotency_key == "held"
    assert (zero.record.payload, four.record.payload) == ({"n": 0}, {"n": 4})
    assert count_jobs(conn) == 5  # the holder, the first, 0, "twice", 4


def test_closing_commits_what_waits_and_refuses_what_comes_after(dsn, conn):
    """The API's stop closes the group: every enqueue queued by then is
    committed and answered (its client may already have sent it); a later
    one is refused, not lost silently."""
    batch = [job_params(type="email", payload={"n": n}) for n in range(6)]
    with held_group(dsn) as (group, first, release):
        with ThreadPoolExecutor(len(batch)) as pool:
            futures = [pool.submit(group.enqueue, batch[0], 10)]
            assert first.wait(10)
            futures += [pool.submit(group.enqueue, params, 10) for params in batch[1:]]
            deadline = time.monotonic() + 10
            while len(group._pending) < len(batch) - 1:
                assert time.monotonic() < deadline, "the enqueues did not queue up"
                threading.Event().wait(0.001)
            closing = asyncio.run_coroutine_threadsafe(group.close(), group.loop)
            release.set()
            closing.result(10)
            assert [f.result(10).record.payload["n"] for f in futures] == list(range(6))
        with pytest.raises(HttpError, match="stopping"):
            group.enqueue(job_params(type="email"), timeout=10)
    assert count_jobs(conn) == 6


def test_a_connection_broken_mid_statement_fails_its_group_and_the_next_goes_on(dsn, conn):
    """The group's backend is terminated while its insert waits on a lock:
    that group's requests get the error (503 over HTTP), and the next group
    opens a new connection."""
    with counted_group(dsn) as (group, taken):
        assert group.enqueue(job_params(type="email"), timeout=10).inserted.created
        with psycopg.connect(dsn) as locker:
            locker.execute("LOCK TABLE pulse_jobs IN ACCESS EXCLUSIVE MODE")
            with ThreadPoolExecutor(1) as pool:
                stuck = pool.submit(group.enqueue, job_params(type="email"), 10)
                deadline = time.monotonic() + 10
                while not conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s AND "
                                       "wait_event_type = 'Lock'", (taken[0],)).fetchone():
                    assert time.monotonic() < deadline, "the insert did not wait on the lock"
                    threading.Event().wait(0.01)
                conn.execute("SELECT pg_terminate_backend(%s)", (taken[0],))
                with pytest.raises(psycopg.OperationalError):
                    stuck.result(10)
        again = group.enqueue(job_params(type="email"), timeout=10)
        assert again.inserted.created and len(taken) == 2 and group.running()
    assert count_jobs(conn) == 2


def test_a_connect_that_raises_a_bug_fails_its_group_and_the_group_lives_on(dsn, conn):
    """Anything connecting raises (here a RuntimeError, not a psycopg error)
    reaches that group's requests, and the next group connects again."""
    calls: list[int] = []

    async def connect() -> psycopg.AsyncConnection:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("no connection for you")
        return await psycopg.AsyncConnection.connect(dsn, autocommit=True)

    with group_on_loop(dsn, connect) as group:
        with pytest.raises(RuntimeError, match="no connection for you"):
            group.enqueue(job_params(type="email"), timeout=10)
        assert group.enqueue(job_params(type="email"), timeout=10).inserted.created
        assert group.running() and len(calls) == 2
    assert count_jobs(conn) == 1


def test_a_refused_group_whose_database_goes_away_fails_at_once(dsn, monkeypatch):
    """A group refused for one bad value is retried one by one; when the
    connection is lost then, the rest of the group gets that error at once
    (it was a connect attempt each: connect_timeout apiece, minutes for a
    large group with the database gone)."""
    calls: list[float] = []
    first, release = threading.Event(), threading.Event()

    async def connect() -> psycopg.AsyncConnection:
        calls.append(time.monotonic())
        if len(calls) == 1:  # the first group waits here while the rest queue up
            conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            first.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
            return conn
        await asyncio.sleep(0.25)  # stands for connect_timeout against a vanished host
        raise psycopg.OperationalError("connection timeout expired")

    real_run = enqueue_group.run_steps_async

    async def run_then_database_gone(conn: Any, steps: Any) -> Any:
        try:
            return await real_run(conn, steps)
        except psycopg.DataError:
            monkeypatch.setattr(enqueue_group, "_hung_up", lambda conn: True)
            raise

    monkeypatch.setattr(enqueue_group, "run_steps_async", run_then_database_gone)
    batch = [job_params(type="email")] + [job_params(type="email", payload={"n": n})
                                          for n in range(21)]
    batch[6] = dict(batch[6], payload="{not json")
    with group_on_loop(dsn, connect) as group:
        try:
            started = time.monotonic()
            outcomes = _enqueue_all(group, batch, first, release)
            took = time.monotonic() - started
        finally:
            release.set()
    assert outcomes[0].inserted.created
    assert [type(e).__name__ for e in outcomes[1:]] == ["OperationalError"] * 21
    assert len(calls) == 2 and took < 5, (len(calls), took)


def test_a_blocking_enqueue_after_the_loop_stopped_is_refused_not_hung(dsn):
    """A handler thread's enqueue() when the loop has stopped (the API's
    stop) is refused within a second or two; it waited forever (it has no
    timeout) for a hand-over nothing would run. A closed loop: refused at
    once, with no coroutine left unawaited."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    group = EnqueueGroup(loop, lambda: psycopg.AsyncConnection.connect(dsn, autocommit=True))
    try:
        assert group.enqueue(job_params(type="email"), timeout=10).inserted.created
        asyncio.run_coroutine_threadsafe(group._drop_connection(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        started = time.monotonic()
        with pytest.raises(HttpError, match="stopping"):
            group.enqueue(job_params(type="email"))
        assert time.monotonic() - started < 3
    finally:
        loop.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(HttpError, match="stopping"):
            group.enqueue(job_params(type="email"))


def test_large_keyed_jobs_on_every_handler_thread_do_not_wedge_the_api(server, conn):
    """A single job over LOOP_BODY_BYTES is answered on a handler thread,
    which waits for the enqueue group. With keyed groups run on a handler
    thread too, 24 such requests took all 16 and the group waited for one
    forever: every later POST /jobs and /healthz hung until the API stopped."""
    pad = "x" * (70 * 1024)
    bodies = [json.dumps({"type": "email", "payload": {"pad": pad}, "idempotency_key": f"k{n}"})
              for n in range(24)]
    client = Client(server.url)
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda body: client.post("/jobs", body), bodies))
    assert [r.status for r in replies] == [201] * 24
    assert client.post("/jobs", {"type": "email"}).status == 201
    assert client.get("/healthz").status in (200, 503)  # answered (no leader here)
    assert count_jobs(conn) == 25


def test_a_metrics_file_that_fails_after_the_commit_keeps_the_jobs_and_the_group(dsn, conn,
                                                                               monkeypatch):
    """Counting the enqueued jobs raised after their commit (a full disk under
    the metrics directory): the group's task died unanswered, and every
    later enqueue hung. The jobs exist, so their callers get them."""
    calls: list[int] = []

    def fails_once(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("No space left on device")

    monkeypatch.setattr(enqueue_group.metrics, "jobs_enqueued", fails_once)
    with counted_group(dsn) as (group, _):
        assert group.enqueue(job_params(type="email"), timeout=10).inserted.created
        assert group.enqueue(job_params(type="email"), timeout=10).inserted.created
        assert group.running() and len(calls) == 2
    assert count_jobs(conn) == 2


def test_a_statement_timeout_in_the_retry_fails_that_request_alone(dsn, conn):
    """One request of a refused group, retried alone, hits its statement
    timeout (an OperationalError on a connection that still works): the
    requests after it are still tried, not failed with its error."""
    conn.execute("CREATE FUNCTION pulse_test_slow() RETURNS trigger LANGUAGE plpgsql AS "
                 "$$ BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$")
    conn.execute("CREATE TRIGGER pulse_test_slow BEFORE INSERT ON pulse_jobs FOR EACH ROW "
                 "WHEN (NEW.type = 'slow') EXECUTE FUNCTION pulse_test_slow()")
    first, release = threading.Event(), threading.Event()

    async def connect() -> psycopg.AsyncConnection:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True,
                                                     options="-c statement_timeout=300")
        if not first.is_set():
            first.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
        return conn

    batch = [job_params(type="email"), job_params(type="email"),
             dict(job_params(type="email"), payload="{not json"),
             job_params(type="slow"), job_params(type="email"), job_params(type="email")]
    try:
        with group_on_loop(dsn, connect) as group:
            outcomes = _enqueue_all(group, batch, first, release)
    finally:
        conn.execute("DROP TRIGGER pulse_test_slow ON pulse_jobs")
        conn.execute("DROP FUNCTION pulse_test_slow()")
    assert [type(o).__name__ for o in outcomes] == [
        "Enqueued", "Enqueued", "InvalidTextRepresentation", "QueryCanceled", "Enqueued",
        "Enqueued"]
    assert count_jobs(conn) == 4


def test_a_blocking_enqueue_handed_over_before_the_loop_stopped_gets_its_job(dsn, conn,
                                                                             monkeypatch):
    """The waiting thread looks up just after the loop ran its hand-over,
    committed its job and stopped: it was told "stopping" (cancel() failed,
    unchecked) though its job exists. Now it gets the job."""
    monkeypatch.setattr(enqueue_group, "STOPPED_CHECK_S", 0.05)
    loop = asyncio.new_event_loop()
    group = EnqueueGroup(loop, lambda: psycopg.AsyncConnection.connect(dsn, autocommit=True))
    timed_out, go_on = threading.Event(), threading.Event()

    class HeldWaiter(enqueue_group.Future):  # type: ignore[misc,name-defined]
        def result(self, timeout: float | None = None) -> Any:
            try:
                return super().result(timeout)
            except enqueue_group.FutureTimeout:
                timed_out.set()
                go_on.wait(10)  # descheduled here while the loop runs and stops
                raise

    monkeypatch.setattr(enqueue_group, "Future", HeldWaiter)
    outcome: dict[str, Any] = {}

    def caller() -> None:
        try:
            outcome["got"] = group.enqueue(job_params(type="email"))
        except Exception as exc:  # noqa: BLE001 - what the caller was told
            outcome["got"] = exc

    thread = threading.Thread(target=caller)
    thread.start()
    try:
        assert timed_out.wait(5)  # the loop is not running: the hand-over waits
        deadline = time.monotonic() + 10
        while count_jobs(conn) == 0:  # the loop runs the hand-over and commits, then stops
            assert time.monotonic() < deadline, "the job was not committed"
            loop.run_until_complete(asyncio.sleep(0.01))
        loop.run_until_complete(asyncio.sleep(0.05))  # its answer is settled
    finally:
        go_on.set()
        thread.join(10)
        loop.run_until_complete(group.close())
        loop.close()
    assert isinstance(outcome["got"], enqueue_group.Enqueued), outcome["got"]
    assert count_jobs(conn) == 1
