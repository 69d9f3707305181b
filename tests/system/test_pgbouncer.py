"""Pulse behind a real PgBouncer in transaction mode (database.pooler).

Daemons whose database.url is a private PgBouncer (pool_mode =
transaction, small max_client_conn; tests/pgbouncer.py) in front of the
test database: jobs are enqueued, claimed, completed, retried and failed
through it, a cancel reaches a running handler, the scheduler elects one
leader and ticks cron through it, and a worker killed with -9 loses no
job. Once with no listen_url (workers poll at worker.poll_interval) and
once with one (wake-ups and cancels over a direct connection)."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import tomli_w

import pulsed
from pulsed.db.store import Store
from pulsed.http.endpoints import BULK_CHUNK
from tests.pg import wait_until
from tests.pgbouncer import PgBouncer, pgbouncer_binary
from tests.system.daemon import Daemon, free_port

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(pgbouncer_binary() is None,
                                 reason="pgbouncer is not installed (apt-get install pgbouncer)")]


@pytest.fixture
def bouncer(dsn: str) -> Iterator[PgBouncer]:
    server = PgBouncer(dsn, max_client_conn=20, pool_size=6).start()
    yield server
    server.stop()


@pytest.fixture
def pooled(bouncer: PgBouncer) -> Iterator[psycopg.Connection]:
    """An application's connection through the pooler (no prepared statements)."""
    with psycopg.connect(bouncer.dsn, autocommit=True, prepare_threshold=None) as conn:
        yield conn


@pytest.fixture
def pooled_daemon(bouncer: PgBouncer, dsn: str, tmp_path: Path
                  ) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def make(name: str = "a", *, listen: bool = False, workers: int = 2,
             worker: dict[str, Any] | None = None, api: dict[str, Any] | None = None) -> Daemon:
        database: dict[str, Any] = {"pooler": "transaction"}
        if listen:
            database["listen_url"] = dsn  # direct, past the pooler
        daemon = Daemon(tmp_path / name, bouncer.dsn, node_id=f"node-{name}", workers=workers,
                        config={"database": database, "worker": worker or {}, "api": api or {}})
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill_all()


def _record(conn: psycopg.Connection, job_id: int) -> Any:
    return Store(conn).get_job(job_id)


def _state(conn: psycopg.Connection, job_id: int) -> str:
    return _record(conn, job_id).state.value


def _running_pid(conn: psycopg.Connection, job_id: int) -> int | None:
    record = _record(conn, job_id)
    if record.state.value != "running" or not record.lease_owner:
        return None
    return int(record.lease_owner.rsplit("/", 1)[1])


def _pooled_backends(conn: psycopg.Connection) -> list[str]:
    """application_name of every server connection PgBouncer holds to this database."""
    return [r[0] for r in conn.execute(
        "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_type = 'client backend' AND pid <> pg_backend_pid()").fetchall()]


def test_lifecycle_through_the_pooler_polling(pooled_daemon, pooled, conn, marks, bouncer):
    """No listen_url: the workers poll. Enqueue, claim, complete, retry,
    fail and a cancel of a running job, all through PgBouncer."""
    daemon = pooled_daemon(worker={"poll_interval": 0.3}).start()
    daemon.wait_ready(timeout=30)
    done = [pulsed.enqueue(pooled, "noop", {"dir": str(marks)}) for _ in range(20)]
    retried = pulsed.enqueue(pooled, "async_fail_first", {"dir": str(marks)})
    failed = pulsed.enqueue(pooled, "async_fail_for_good", {}, max_attempts=3)
    running = pulsed.enqueue(pooled, "cancellable", {"dir": str(marks)})

    wait_until(lambda: all(_state(conn, j) == "completed" for j in done), timeout=20,
               message=lambda: f"not all jobs completed; log:\n{daemon.log_tail()}")
    wait_until(lambda: _state(conn, failed) == "failed", timeout=10,
               message="the job that fails for good did not fail")
    wait_until(lambda: _state(conn, running) == "running", timeout=10,
               message="the cancellable job never started")
    assert pulsed.cancel(pooled, running)
    # No NOTIFY reaches a worker behind the pooler: it polls for cancels.
    wait_until(lambda: list(marks.glob(f"{running}.*.saw-cancel")), timeout=10,
               message=lambda: f"the running handler never saw its cancel:\n{daemon.log_tail()}")
    wait_until(lambda: _state(conn, retried) == "completed", timeout=20,
               message="the retried job did not complete on its second attempt")
    assert _record(conn, retried).attempt == 2
    assert [a.outcome for a in _record(conn, failed).attempts] == ["error"]
    assert "unsupported startup parameter" not in bouncer.log_path.read_text()
    # Everything went through the pooler: every backend is one of its pool.
    assert len(_pooled_backends(conn)) <= 6


def test_listen_url_wakes_idle_workers_at_once_and_carries_cancels(pooled_daemon, pooled, conn,
                                                                   marks):
    """With listen_url the workers LISTEN on a direct connection: with a
    30 s poll interval, a job enqueued through the pooler still starts
    within a second or two, and a cancel reaches its handler."""
    daemon = pooled_daemon(listen=True, worker={"poll_interval": 30}).start()
    daemon.wait_ready(timeout=30)
    wait_until(lambda: any(n.endswith(" listen") for n in _pooled_backends(conn)), timeout=10,
               message="no worker opened its direct LISTEN connection")
    for _ in range(3):  # each idle wait ends by its wake-up, not by polling
        enqueued = time.monotonic()
        job_id = pulsed.enqueue(pooled, "noop", {"dir": str(marks)})
        wait_until(lambda: _state(conn, job_id) == "completed", timeout=10,
                   message=lambda: f"no wake-up reached the workers:\n{daemon.log_tail()}")
        assert time.monotonic() - enqueued < 5, "the job waited for a poll, not a wake-up"
    running = pulsed.enqueue(pooled, "cancellable", {"dir": str(marks)})
    wait_until(lambda: _state(conn, running) == "running", timeout=10,
               message="the cancellable job never started")
    assert pulsed.cancel(pooled, running)
    wait_until(lambda: list(marks.glob(f"{running}.*.saw-cancel")), timeout=5,
               message="the cancel NOTIFY never reached the handler")


def test_leader_election_and_cron_through_the_pooler(pooled_daemon, conn):
    """Two daemons behind the pooler: one leader; cron ticks enqueued by
    it and run; after the leader is killed with -9 the other takes over
    and cron goes on."""
    daemons = {name: pooled_daemon(name, workers=1) for name in ("a", "b")}
    for daemon in daemons.values():
        daemon.config["cron"] = [{"name": "tick", "type": "noop", "every": 1}]
        daemon.config_path.write_text(tomli_w.dumps(daemon.config))
        daemon.start()
    for daemon in daemons.values():
        daemon.wait_ready(timeout=30)

    def leader() -> str | None:
        row = Store(conn).leader_get()
        return row["leader_id"].rsplit("/", 1)[0] if row and row["live"] else None

    first = wait_until(leader, timeout=15, message="no leader was elected")

    def ticks_completed() -> int:
        return conn.execute("SELECT count(*) FROM pulse_jobs WHERE type = 'noop' "
                            "AND state = 'completed'").fetchone()[0]

    wait_until(lambda: ticks_completed() >= 2, timeout=15, message="cron never ticked")
    leader_daemon = next(d for d in daemons.values() if d.config["daemon"]["node_id"] == first)
    os.killpg(leader_daemon.pid, signal.SIGKILL)
    other = next(d for d in daemons.values() if d is not leader_daemon)
    wait_until(lambda: leader() == other.config["daemon"]["node_id"], timeout=20,
               message=lambda: f"no failover to the other node:\n{other.log_tail()}")
    seen = ticks_completed()
    wait_until(lambda: ticks_completed() >= seen + 2, timeout=15,
               message="cron stopped after the failover")
    jobs, ticks = conn.execute(
        "SELECT (SELECT count(*) FROM pulse_jobs WHERE type = 'noop'), "
        "(SELECT count(DISTINCT job_id) FROM pulse_cron_ticks WHERE name = 'tick')").fetchone()
    assert jobs == ticks, f"{jobs} cron jobs for {ticks} ticks: a tick was enqueued twice"


def test_kill_9_of_a_busy_worker_behind_the_pooler(pooled_daemon, pooled, conn, marks):
    daemon = pooled_daemon(worker={"poll_interval": 0.3}).start()
    daemon.wait_ready(timeout=30)
    job_id = pulsed.enqueue(pooled, "sleep_first", {"s": 60, "dir": str(marks)})
    worker_pid = wait_until(lambda: _running_pid(conn, job_id), timeout=10,
                            message="the job never started")
    os.kill(worker_pid, signal.SIGKILL)
    wait_until(lambda: _state(conn, job_id) == "completed", timeout=20,
               message=lambda: f"the killed worker's job was not run again:\n"
                               f"{daemon.log_tail()}")
    record = _record(conn, job_id)
    assert [a.outcome for a in record.attempts] == ["worker_died", "completed"]


def _http(port: int, method: str, path: str, body: dict | list | None = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def test_http_api_enqueues_and_reads_through_the_pooler(pooled_daemon, conn):
    """The API's connection pool goes through PgBouncer too: more requests
    than psycopg's prepare threshold (5), so a prepared statement would
    meet a server connection that never saw it."""
    port = free_port()
    daemon = pooled_daemon(api={"enabled": True, "listen": f"127.0.0.1:{port}"},
                           worker={"poll_interval": 0.3}).start()
    daemon.wait_ready(timeout=30)
    wait_until(lambda: _answers(port), timeout=15,
               message=lambda: f"the API never answered:\n{daemon.log_tail()}")
    created = [_http(port, "POST", "/jobs", {"type": "noop", "payload": {}})["id"]
               for _ in range(12)]
    # an array over several chunks: its statements pipelined in one transaction
    created += [job["id"] for job in _http(port, "POST", "/jobs",
                                           [{"type": "noop"}] * (BULK_CHUNK * 2 + 1))]
    # a group with an idempotency key: a transaction on the group's connection
    created.append(_http(port, "POST", "/jobs",
                         {"type": "noop", "idempotency_key": "pooled"})["id"])
    wait_until(lambda: all(_http(port, "GET", f"/jobs/{j}")["state"] == "completed"
                           for j in created), timeout=20,
               message=lambda: f"jobs enqueued over HTTP did not complete:\n{daemon.log_tail()}")
    assert all(_state(conn, j) == "completed" for j in created)
    assert "prepared statement" not in daemon.log_text()


def _answers(port: int) -> bool:
    try:
        _http(port, "GET", "/healthz")
        return True
    except OSError:
        return False
