"""GET /jobs/{id}?wait= against a real ApiServer: long polls hold no pooled
connection and no handler thread while they wait (seven of them used to
take the whole pool: /healthz answered 503 saying the database was down),
they end by NOTIFY, by the recheck when no NOTIFY comes, and at once when
the API stops; and the pool passes over connections the server ended."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

import pulsed
from pulsed.config import ApiConfig, Config
from pulsed.db.store import Store
from pulsed.http import ApiServer, long_poll
from pulsed.http.server import POOL_SIZE
from tests.pg import wait_until

LISTENER = ("SELECT pid FROM pg_stat_activity WHERE query = 'LISTEN pulse_done' "
            "AND datname = current_database() AND pid <> pg_backend_pid()")


def _get(url: str, timeout: float = 30) -> tuple[int, dict, float]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read()), time.monotonic() - started
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read()), time.monotonic() - started


def _waiting_rows(conn: psycopg.Connection, job_id: int) -> int:
    return conn.execute("SELECT count(*) FROM pulse_job_waiters WHERE job_id = %s",
                        (job_id,)).fetchone()[0]


@pytest.fixture
def api(dsn):
    config = Config(api=ApiConfig(enabled=True, listen="127.0.0.1:0"))
    with ApiServer(config, dsn) as server:
        yield server


def test_long_polls_beyond_the_pool_leave_reads_and_health_answering(api, conn, monkeypatch):
    monkeypatch.setattr(long_poll, "RECHECK_S", 30.0)  # only the NOTIFY can end them in time
    job_id = pulsed.enqueue(conn, "nobody-runs-this")
    conn.commit()
    polls = POOL_SIZE + 6
    with ThreadPoolExecutor(polls) as pool:
        waits = [pool.submit(_get, f"{api.url}/jobs/{job_id}?wait=30") for _ in range(polls)]
        wait_until(lambda: _waiting_rows(conn, job_id) == polls, timeout=10)
        status, body, took = _get(api.url + "/healthz", timeout=10)
        assert body["checks"]["database"] == {"ok": True} and took < 2.0, (body, took)
        for path in (f"/jobs/{job_id}", "/jobs?limit=5"):
            status, body, took = _get(api.url + path, timeout=10)
            assert status == 200 and took < 2.0, (path, status, body, took)
        assert not any(w.done() for w in waits)
        Store(conn).cancel(job_id)  # a finishing statement: NOTIFY pulse_done for the waiters
        ended = time.monotonic()
        answers = [w.result(timeout=10) for w in waits]
    assert {(status, body["state"]) for status, body, _ in answers} == {(200, "cancelled")}
    assert time.monotonic() - ended < 3.0
    wait_until(lambda: _waiting_rows(conn, job_id) == 0, timeout=5)


def test_a_long_poll_ends_without_a_notify_by_the_recheck(api, conn):
    job_id = pulsed.enqueue(conn, "nobody-runs-this")
    conn.commit()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_get, f"{api.url}/jobs/{job_id}?wait=30")
        wait_until(lambda: _waiting_rows(conn, job_id) == 1, timeout=10)
        # as the reaper fails a job whose worker died on its last attempt: no NOTIFY
        conn.execute("UPDATE pulse_jobs SET state = 'failed', finished_at = now() WHERE id = %s",
                     (job_id,))
        conn.commit()
        status, body, took = waiting.result(timeout=10)
    assert (status, body["state"]) == (200, "failed")
    assert took < long_poll.RECHECK_S * 3 + 1


def test_a_long_poll_answers_with_the_job_as_it_is_when_time_is_up(api, conn):
    job_id = pulsed.enqueue(conn, "nobody-runs-this")
    conn.commit()
    status, body, took = _get(f"{api.url}/jobs/{job_id}?wait=0.5")
    assert (status, body["state"]) == (200, "available")
    assert 0.5 <= took < 3
    status, body, _ = _get(f"{api.url}/jobs/999999?wait=0.5")
    assert (status, body["error"]["code"]) == (404, "not_found")
    assert _waiting_rows(conn, job_id) == 0


def test_a_long_poll_is_answered_when_the_api_stops(dsn, conn):
    job_id = pulsed.enqueue(conn, "nobody-runs-this")
    conn.commit()
    server = ApiServer(Config(api=ApiConfig(enabled=True, listen="127.0.0.1:0")), dsn).start()
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(_get, f"{server.url}/jobs/{job_id}?wait=30")
            wait_until(lambda: _waiting_rows(conn, job_id) == 1, timeout=10)
            stopping = time.monotonic()
            server.stop(grace=10)
            assert time.monotonic() - stopping < 5
            status, body, _ = waiting.result(timeout=5)
    finally:
        server.stop()
    assert (status, body["state"]) == (200, "available")


def test_a_long_poll_outlives_its_watchers_connection(api, conn, monkeypatch):
    monkeypatch.setattr(long_poll, "RECHECK_S", 30.0)  # only a NOTIFY can end it in time
    job_id = pulsed.enqueue(conn, "nobody-runs-this")
    conn.commit()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_get, f"{api.url}/jobs/{job_id}?wait=30")
        wait_until(lambda: _waiting_rows(conn, job_id) == 1, timeout=10)
        wait_until(lambda: conn.execute(LISTENER).fetchall(), timeout=10)
        (first,), = conn.execute(LISTENER).fetchall()
        conn.execute("SELECT pg_terminate_backend(%s)", (first,))
        conn.commit()
        # the watcher listens again on a new connection, and its NOTIFY ends the poll
        wait_until(lambda: [r for r in conn.execute(LISTENER).fetchall() if r[0] != first],
                   timeout=10)
        assert not waiting.done()
        Store(conn).cancel(job_id)
        status, body, _ = waiting.result(timeout=5)
    assert (status, body["state"]) == (200, "cancelled")


def test_reads_pass_over_pooled_connections_the_server_ended(api, conn):
    job_id = pulsed.enqueue(conn, "nobody-runs-this")
    conn.commit()
    held = [api.pool.getconn() for _ in range(POOL_SIZE)]  # the pool at its size, idle
    for conn_ in held:
        api.pool.putconn(conn_)
    ended = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                         "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                         "AND application_name LIKE 'pulse api%%'").fetchone()[0]
    conn.commit()
    assert ended >= 3  # psycopg_pool's check waited 1 + 2 + 4 s over three dead ones
    status, body, took = _get(f"{api.url}/jobs/{job_id}")
    assert (status, body["state"]) == (200, "available")
    assert took < 2.0


def test_the_watcher_does_not_stand_down_under_a_long_poll_on_its_way_in(api, conn,
                                                                         monkeypatch):
    # The watcher closes after IDLE_CLOSE_S without waiters. A long poll still
    # adding its waiter row (on a thread) when that tick came was left with no
    # watcher: no NOTIFY, no recheck, an answer only at its deadline.
    monkeypatch.setattr(long_poll, "IDLE_CLOSE_S", 0.0)
    monkeypatch.setattr(long_poll, "RECHECK_S", 0.05)
    slow_begin = long_poll._begin

    def begin_slowly(*args):
        time.sleep(0.5)  # several of the watcher's ticks pass meanwhile
        return slow_begin(*args)

    monkeypatch.setattr(long_poll, "_begin", begin_slowly)
    job_id = pulsed.enqueue(conn, "nobody-runs-this")
    conn.commit()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_get, f"{api.url}/jobs/{job_id}?wait=20")
        wait_until(lambda: _waiting_rows(conn, job_id) == 1, timeout=10)
        monkeypatch.setattr(long_poll, "RECHECK_S", 30.0)  # from here only a NOTIFY is in time
        Store(conn).cancel(job_id)
        status, body, took = waiting.result(timeout=25)
    assert (status, body["state"]) == (200, "cancelled")
    assert took < 5, took
