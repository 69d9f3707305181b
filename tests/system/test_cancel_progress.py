"""Cancelling a running job and reporting progress, against the real
daemon: the handler sees job.cancelled within about a second; one that
ignores it is stopped cancel_grace later; progress is written, coalesced."""

from __future__ import annotations

import time

import pytest

import pulsed
from pulsed import serialize
from pulsed.db.store import Store
from tests.pg import wait_until

pytestmark = pytest.mark.timeout(90)


def _job(conn, job_id):
    return Store(conn).get_job(job_id)


def _started(marks, job_id) -> bool:
    return any(marks.glob(f"{job_id}.*.start"))


def _worker(daemon) -> dict:
    """The running worker's status (pid None while it is being replaced)."""
    return next((c for c in daemon.status()["children"] if c["role"] == "worker" and c["pid"]),
                {"pid": None, "jobs": None, "restarts": None})


@pytest.mark.parametrize("handler, concurrency", [("cancellable", 1),
                                                  ("async_cancellable", 4)])
def test_a_running_handler_sees_the_cancel_and_the_job_ends_cancelled(
        handler, concurrency, daemon_factory, conn, marks):
    daemon = daemon_factory(workers=1, config={"worker": {"concurrency": concurrency}}).start()
    daemon.wait_ready()
    job_id = pulsed.enqueue(conn, handler, {"dir": str(marks)})
    wait_until(lambda: _started(marks, job_id), timeout=15, message="the job never started")

    cancelled_at = time.monotonic()
    assert pulsed.cancel(conn, job_id)
    wait_until(lambda: any(marks.glob(f"{job_id}.*.saw-cancel")), timeout=5,
               message="the handler never saw job.cancelled")
    assert time.monotonic() - cancelled_at < 2.0
    record = _job(conn, job_id)
    assert record.state.value == "cancelled"
    assert [a.outcome for a in record.attempts] == ["cancelled"]
    wait_until(lambda: _worker(daemon)["jobs"] == [], timeout=5,
               message="the worker still lists the cancelled job")
    assert _worker(daemon)["restarts"] == 0


@pytest.mark.parametrize("handler, worker_killed", [("ignores_cancel", True),
                                                    ("async_ignores_cancel", False)])
def test_a_handler_that_ignores_the_cancel_is_stopped_after_the_grace(
        handler, worker_killed, daemon_factory, conn, marks):
    daemon = daemon_factory(workers=1, config={
        "worker": {"cancel_grace": 1, "concurrency": 2}}).start()
    daemon.wait_ready()
    job_id = pulsed.enqueue(conn, handler, {"dir": str(marks)})
    sibling = pulsed.enqueue(conn, "long_once", {"s": 60, "dir": str(marks)})
    wait_until(lambda: _started(marks, job_id) and _started(marks, sibling), timeout=15,
               message="the jobs never started")
    pid = _worker(daemon)["pid"]

    assert pulsed.cancel(conn, job_id)
    # sync: the master kills the process at the grace (+ its 2 s margin);
    # asyncio: the task is cancelled at the grace, the process lives on.
    wait_until(lambda: (worker := _worker(daemon))["pid"] is not None
               and (worker["pid"] != pid) == worker_killed
               and job_id not in (worker["jobs"] or []), timeout=15,
               message=lambda: f"the handler was not stopped; log:\n{daemon.log_tail()}")
    assert _job(conn, job_id).state.value == "cancelled"
    # The sibling in the same process is unharmed: interrupted (its attempt
    # given back) when the process was stopped, then completed; running on
    # when only the cancelled task was.
    if worker_killed:
        wait_until(lambda: _job(conn, sibling).state.value == "completed", timeout=20,
                   message=lambda: f"the sibling did not complete; log:\n{daemon.log_tail()}")
        record = _job(conn, sibling)
        assert [a.outcome for a in record.attempts] == ["interrupted", "completed"]
        assert record.attempt == 1
    else:
        assert _job(conn, sibling).state.value == "running"
        assert _worker(daemon)["jobs"] == [sibling]
    after = pulsed.enqueue(conn, "noop", {"dir": str(marks)})
    wait_until(lambda: _job(conn, after).state.value == "completed", timeout=15,
               message="jobs no longer run after the cancel")


def test_progress_is_written_about_once_a_second_and_shown(daemon_factory, conn, marks):
    daemon = daemon_factory(workers=1).start()
    daemon.wait_ready()
    job_id = pulsed.enqueue(conn, "reports_progress", {"dir": str(marks)})
    wait_until(lambda: _started(marks, job_id), timeout=15, message="the job never started")
    updates_before = conn.execute(
        "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'pulse_jobs'").fetchone()[0]
    wait_until(lambda: (_job(conn, job_id).progress or {}).get("message") == "halfway",
               timeout=5, message="the progress never reached the database")
    progress = _job(conn, job_id).progress
    assert progress["fraction"] == 0.5 and progress["at"]
    assert serialize.job_to_dict(_job(conn, job_id))["progress"] == progress
    (marks / "release").touch()
    wait_until(lambda: _job(conn, job_id).state.value == "completed", timeout=10,
               message="the job did not complete")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    updates = conn.execute(
        "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'pulse_jobs'").fetchone()[0]
    # 100,002 progress calls: a few writes (the stats lag, so this is a bound)
    assert updates - updates_before < 50


def test_progress_from_8_threads_of_one_worker_is_in_status_and_the_rows(
        daemon_factory, conn, marks):
    daemon = daemon_factory(workers=1, config={"worker": {"concurrency": 8}}).start()
    daemon.wait_ready()
    ids = pulsed.enqueue_many(conn, [{"type": "threaded_progress",
                                      "payload": {"dir": str(marks)}}] * 8)
    wait_until(lambda: all(any(marks.glob(f"{i}.*.start")) for i in ids), timeout=15,
               message="the 8 jobs never started")
    wait_until(lambda: all((_job(conn, i).progress or {}).get("message") == f"job {i} at 1000"
                           for i in ids), timeout=10,
               message=lambda: f"progress missing: {[_job(conn, i).progress for i in ids]}")
    # The status (pulsectl status / top, the page) shows the first job's.
    wait_until(lambda: (_worker(daemon).get("progress") or {}).get("fraction") == 1.0,
               timeout=10, message=lambda: f"no progress in status: {_worker(daemon)}")
    (marks / "release").touch()
    wait_until(lambda: all(_job(conn, i).state.value == "completed" for i in ids), timeout=15,
               message="the jobs did not complete")


def test_a_2_mib_result_is_refused_with_a_clear_error(daemon_factory, conn):
    daemon = daemon_factory(workers=1).start()
    daemon.wait_ready()
    job_id = pulsed.enqueue(conn, "big_result", max_attempts=1)
    wait_until(lambda: _job(conn, job_id).state.value == "failed", timeout=15,
               message=lambda: f"the job did not fail; log:\n{daemon.log_tail()}")
    record = _job(conn, job_id)
    assert record.result is None
    assert "2,097,154 bytes as JSON, over worker.max_result_bytes (1,048,576)" in \
        record.last_error


def test_wait_returns_soon_after_the_completion(daemon_factory, conn, dsn, marks):
    """Logged, not asserted as a time: how long after the completion's
    commit pulsed.wait() returned."""
    import psycopg
    daemon = daemon_factory(workers=1).start()
    daemon.wait_ready()
    job_id = pulsed.enqueue(conn, "sleep", {"s": 0.5, "dir": str(marks)})
    with psycopg.connect(dsn, autocommit=True) as waiter:
        record = pulsed.wait(waiter, job_id, timeout=20)
        returned = waiter.execute("SELECT clock_timestamp()").fetchone()[0]
    latency_ms = (returned - record.finished_at).total_seconds() * 1000
    print(f"WAIT-LATENCY pulsed.wait returned {latency_ms:.1f} ms after the completion")
    assert record.state.value == "completed"
