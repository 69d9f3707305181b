"""Every execution mode keeps every rule: one job at a time, threads and
asyncio, against the real daemon (issue: the job ledger).

Each case forks a real `pulsed`, runs jobs in one mode and checks the
attempt history the database kept: a killed worker's started jobs get
exactly one `worker_died` attempt each, a hung job among several is
`timeout` and its siblings `interrupted`, async handlers really run, and a
job that keeps killing its worker is failed as poison while others flow.
"""

from __future__ import annotations

import os
import signal

import psycopg
import pytest

import pulsed
from pulsed.db.store import Store
from tests.pg import wait_until

pytestmark = pytest.mark.timeout(120)

MODES = {
    # name: (worker.concurrency, the long handler)
    "threads": (4, "long_once"),
    "asyncio": (4, "async_long_once"),
}


def _jobs(conn: psycopg.Connection, ids: list[int]):
    store = Store(conn)
    return [store.get_job(job_id) for job_id in ids]


def _states(conn: psycopg.Connection, ids: list[int]) -> list[str]:
    return [record.state.value for record in _jobs(conn, ids)]


def _worker(daemon) -> dict:
    [worker] = [c for c in daemon.status()["children"] if c["role"] == "worker" and c["pid"]]
    return worker


def _running_on_board(daemon, count: int, marks=None):
    """The worker's status once it lists `count` running jobs (and, with
    marks, once each of their handlers has begun: a job is on the board from
    its dispatch, a moment before its thread or task runs it)."""
    worker = _worker(daemon)
    if len(worker["jobs"]) != count:
        return None
    if marks is not None and not all(any(marks.glob(f"{job_id}.*.start"))
                                     for job_id in worker["jobs"]):
        return None
    return worker


@pytest.mark.parametrize("mode", sorted(MODES))
def test_kill_9_of_a_worker_running_4_jobs_records_4_worker_died_attempts(
        mode, daemon_factory, conn, marks):
    concurrency, handler = MODES[mode]
    daemon = daemon_factory(workers=1, config={"worker": {"concurrency": concurrency}}).start()
    daemon.wait_ready()
    ids = pulsed.enqueue_many(conn, [{"type": handler, "payload": {"s": 60, "dir": str(marks)}}
                                     for _ in range(4)])
    conn.commit()
    worker = wait_until(lambda: _running_on_board(daemon, 4, marks), timeout=15,
                        message="the worker never listed 4 running jobs")
    assert worker["job"] == worker["jobs"][0] and sorted(worker["jobs"]) == sorted(ids)

    os.kill(worker["pid"], signal.SIGKILL)

    wait_until(lambda: _states(conn, ids) == ["completed"] * 4, timeout=30,
               message=lambda: f"the jobs did not complete after the kill: "
                               f"{[(r.state.value, r.attempt, r.run_at) for r in _jobs(conn, ids)]} "
                               f"{_worker(daemon)}; log:\n{daemon.log_tail()}")
    for record in _jobs(conn, ids):
        assert record.attempt == 2, record
        assert [a.outcome for a in record.attempts] == ["worker_died", "completed"], record
        assert "signal 9" in record.attempts[0].error_message


def test_kill_9_of_a_one_job_worker_records_only_the_started_job(daemon_factory, conn, marks):
    """concurrency 1: the started job gets worker_died; a job claimed with
    it but not started goes back unharmed (attempt 0, no history)."""
    daemon = daemon_factory(workers=1).start()
    daemon.wait_ready()
    [long_id] = pulsed.enqueue_many(conn, [{"type": "long_once",
                                            "payload": {"s": 60, "dir": str(marks)}}])
    conn.commit()
    worker = wait_until(lambda: _running_on_board(daemon, 1, marks), timeout=15,
                        message="the job never started")
    later = pulsed.enqueue(conn, "noop", {"dir": str(marks)})
    conn.commit()
    os.kill(worker["pid"], signal.SIGKILL)
    wait_until(lambda: _states(conn, [long_id, later]) == ["completed"] * 2, timeout=30,
               message=lambda: f"the jobs did not complete; log:\n{daemon.log_tail()}")
    long_job, quick_job = _jobs(conn, [long_id, later])
    assert [a.outcome for a in long_job.attempts] == ["worker_died", "completed"]
    assert quick_job.attempt == 1 and [a.outcome for a in quick_job.attempts] == ["completed"]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_hung_job_among_4_is_killed_at_its_timeout_and_its_siblings_interrupted(
        mode, daemon_factory, conn, marks):
    concurrency, handler = MODES[mode]
    hang = "hang" if mode == "threads" else "async_hang"
    daemon = daemon_factory(workers=1, config={"worker": {"concurrency": concurrency}}).start()
    daemon.wait_ready()
    payload = {"s": 60, "dir": str(marks)}
    siblings = pulsed.enqueue_many(conn, [{"type": handler, "payload": payload}] * 3)
    conn.commit()
    wait_until(lambda: _running_on_board(daemon, 3, marks), timeout=15,
               message="the siblings never started")
    hung = pulsed.enqueue(conn, hang, {"dir": str(marks)}, timeout=1, max_attempts=1)
    conn.commit()

    wait_until(lambda: _states(conn, [hung]) == ["failed"], timeout=30,
               message=lambda: f"the hung job was not killed; {_states(conn, siblings + [hung])} "
               f"{daemon.status()['children']} log:\n{daemon.log_tail()}")
    [hung_job] = _jobs(conn, [hung])
    assert [a.outcome for a in hung_job.attempts] == ["timeout"]
    wait_until(lambda: _states(conn, siblings) == ["completed"] * 3, timeout=30,
               message=lambda: f"the siblings did not complete; log:\n{daemon.log_tail()}")
    for record in _jobs(conn, siblings):
        # The interrupted run gave its attempt back: the rerun is attempt 1 again.
        assert [(a.attempt, a.outcome) for a in record.attempts] == [
            (1, "interrupted"), (1, "completed")], record
        assert record.attempt == 1


def test_async_handlers_really_run_and_failures_are_retried(daemon_factory, conn, dsn, marks):
    conn.execute("CREATE TABLE side_effects (job_id bigint, attempt int)")
    conn.commit()
    daemon = daemon_factory(workers=1, config={"worker": {"concurrency": 8}}).start()
    daemon.wait_ready()
    recorded = pulsed.enqueue_many(conn, [{"type": "async_record", "payload": {"dsn": dsn}}
                                          for _ in range(20)])
    flaky = pulsed.enqueue(conn, "async_fail_first", {"dir": str(marks)})
    failing = pulsed.enqueue(conn, "async_fail_for_good")
    coroutine = pulsed.enqueue(conn, "returns_coroutine", {"dir": str(marks)}, max_attempts=1)
    conn.commit()

    wait_until(lambda: set(_states(conn, recorded + [flaky, failing, coroutine])) <= {
        "completed", "failed"}, timeout=30, message=lambda: f"jobs unfinished; log:\n{daemon.log_tail()}")
    effects = conn.execute("SELECT job_id, attempt FROM side_effects ORDER BY job_id").fetchall()
    assert effects == [(job_id, 1) for job_id in sorted(recorded)]
    assert _states(conn, recorded) == ["completed"] * 20
    [flaky_job, failing_job, coroutine_job] = _jobs(conn, [flaky, failing, coroutine])
    assert flaky_job.state.value == "completed"
    assert [a.outcome for a in flaky_job.attempts] == ["error", "completed"]
    assert "async boom" in flaky_job.attempts[0].error_message
    assert failing_job.state.value == "failed" and failing_job.attempt == 1
    # A plain function returning a coroutine never ran its work: an error.
    assert coroutine_job.state.value == "failed"
    assert "without awaiting it" in coroutine_job.last_error
    assert not list(marks.glob(f"{coroutine}.*.done"))


def test_an_async_handler_runs_at_concurrency_1(daemon_factory, conn, dsn):
    conn.execute("CREATE TABLE side_effects (job_id bigint, attempt int)")
    conn.commit()
    daemon = daemon_factory(workers=1).start()
    daemon.wait_ready()
    ids = pulsed.enqueue_many(conn, [{"type": "async_record", "payload": {"dsn": dsn, "s": 0}}
                                     for _ in range(5)])
    conn.commit()
    wait_until(lambda: _states(conn, ids) == ["completed"] * 5, timeout=20,
               message=lambda: f"async jobs did not complete; log:\n{daemon.log_tail()}")
    assert conn.execute("SELECT count(*) FROM side_effects").fetchone()[0] == 5


def test_a_poison_job_runs_poison_after_times_and_fails_while_others_flow(
        daemon_factory, conn, marks):
    daemon = daemon_factory(workers=2, config={"worker": {"poison_after": 3}}).start()
    daemon.wait_ready()
    poison = pulsed.enqueue(conn, "exit3", {"dir": str(marks)})
    conn.commit()
    others: list[int] = []
    wait_until(lambda: (others.extend(pulsed.enqueue_many(
                            conn, [{"type": "noop", "payload": {"dir": str(marks)}}] * 20)),
                        conn.commit(), _states(conn, [poison]) == ["failed"])[-1],
               timeout=60, interval=0.5,
               message=lambda: f"the poison job was not failed; log:\n{daemon.log_tail()}")
    [record] = _jobs(conn, [poison])
    assert [a.outcome for a in record.attempts] == ["worker_died"] * 3
    assert len(list(marks.glob(f"{poison}.*.start"))) == 3
    assert "poison" in record.last_error
    wait_until(lambda: set(_states(conn, others)) == {"completed"}, timeout=20,
               message="other jobs stopped flowing")


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_stop_past_its_timeout_interrupts_jobs_without_using_their_attempt(
        concurrency, daemon_factory, conn, marks):
    """A deploy must never fail a job: on its last attempt, a job killed at
    the stop deadline is given back `interrupted` and runs again later."""
    daemon = daemon_factory(workers=1, config={
        "daemon": {"stop_timeout": 1}, "worker": {"concurrency": concurrency}}).start()
    daemon.wait_ready()
    job_id = pulsed.enqueue(conn, "long_once", {"s": 60, "dir": str(marks)}, max_attempts=1)
    conn.commit()
    wait_until(lambda: _running_on_board(daemon, 1, marks), timeout=15,
               message="the job never started")

    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=20) == 0

    [record] = _jobs(conn, [job_id])
    assert (record.state.value, record.attempt) == ("available", 0), record
    assert [(a.attempt, a.outcome) for a in record.attempts] == [(1, "interrupted")]
    again = daemon_factory("again", workers=1).start()
    wait_until(lambda: _states(conn, [job_id]) == ["completed"], timeout=20,
               message=lambda: f"the job did not run again; log:\n{again.log_tail()}")
