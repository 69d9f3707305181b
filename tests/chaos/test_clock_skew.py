"""Hosts whose wall clock disagrees with the database server's (NTP broken,
a VM resumed from a snapshot). PostgreSQL's now() is the one clock for
shared state: a daemon minutes ahead or behind must promote, lease, reap,
lead and fire cron ticks on the database's time, not its own.

The skewed daemons run under libfaketime with only the wall clock moved
(FAKETIME_DONT_FAKE_MONOTONIC=1), as on a real host whose NTP is broken.
libfaketime 0.9.10 then fails time.sleep() (its absolute clock_nanosleep on
the monotonic clock) with EINVAL; faking the monotonic clock too is no way
out (a threading.Event.wait() then blocks for the skew: the kernel waits on
the real clock). So the daemons load SLEEP_SHIM as sitecustomize: a
time.sleep() on select(), which libfaketime leaves alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

import pulsed

from tests.pg import wait_until
from tests.system.daemon import REPO
from tests.system.test_scheduler_cluster import with_cron

pytestmark = pytest.mark.timeout(90)

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
SKEW_S = 600  # ten minutes

if not FAKETIME_LIB.exists():
    pytest.skip(f"libfaketime is not installed ({FAKETIME_LIB})", allow_module_level=True)


SLEEP_SHIM = """\
import select, time

def _sleep(seconds, _monotonic=time.monotonic, _select=select.select):
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    deadline = _monotonic() + seconds
    while (left := deadline - _monotonic()) > 0:
        _select([], [], [], left)

time.sleep = _sleep
"""
SHIM_DIR = Path(tempfile.mkdtemp(prefix="pulse-faketime-shim-"))
(SHIM_DIR / "sitecustomize.py").write_text(SLEEP_SHIM)


def skewed(seconds: int) -> dict[str, str]:
    """The environment of a process whose wall clock alone is `seconds` off."""
    return {"LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": f"{seconds:+d}",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1", "PYTHONPATH": f"{SHIM_DIR}:{REPO}"}


def test_faketime_moves_the_wall_clock_and_keeps_durations():
    """The harness itself: a child under skewed() sees its wall clock ten
    minutes ahead, sleeps, and measures the sleep right."""
    code = ("import threading, time; t = time.monotonic(); time.sleep(0.2); "
            "threading.Event().wait(0.2); print(time.time(), time.monotonic() - t)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **skewed(SKEW_S)},
                         capture_output=True, text=True, check=True)
    wall, slept = (float(v) for v in out.stdout.split())
    assert abs(wall - time.time() - SKEW_S) < 5
    assert 0.35 < slept < 1.5


def cron_ticks(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT tick, tick - now() AS ahead, job_id FROM pulse_cron_ticks"
                        " WHERE name = 'beat' ORDER BY tick").fetchall()


@pytest.mark.parametrize("skew", [SKEW_S, -SKEW_S])
def test_cron_of_a_skewed_leader_fires_on_the_database_time_and_fails_over(
        daemon_factory, conn, skew):
    """A leader ten minutes ahead used to enqueue ticks labelled ten
    minutes in the future (each fired ten minutes early), and a correct
    host taking over then enqueued nothing until the database's clock
    passed the newest of them; a leader behind fired each tick ten
    minutes late. Ticks are the database's now(), whoever leads."""
    entry = {"name": "beat", "type": "noop", "every": "1s"}
    off = with_cron(daemon_factory("off", workers=1, env=skewed(skew)), [entry]).start()
    off.wait_ready()
    wait_until(lambda: len([t for t in cron_ticks(conn) if t[2] is not None]) >= 3,
               timeout=20, message=lambda: f"3 ticks from the skewed leader\n{off.log_tail()}")
    for tick, ahead, _job in cron_ticks(conn):
        assert abs(ahead.total_seconds()) < 5, f"tick {tick} is {ahead} off the database's now()"
    off.signal(15)
    off.wait_exit()
    fired = conn.execute("SELECT count(*) FROM pulse_cron_ticks WHERE job_id IS NOT NULL"
                         ).fetchone()[0]
    right = with_cron(daemon_factory("right", workers=1), [entry]).start()
    right.wait_ready()
    wait_until(lambda: conn.execute("SELECT count(*) FROM pulse_cron_ticks"
                                    " WHERE job_id IS NOT NULL").fetchone()[0] >= fired + 3,
               timeout=15, message=lambda: f"3 ticks after failover\n{cron_ticks(conn)[-5:]}")
    dupes = conn.execute("SELECT idempotency_key, count(*) FROM pulse_jobs WHERE type = 'noop'"
                         " GROUP BY 1 HAVING count(*) > 1").fetchall()
    assert dupes == []


def test_two_daemons_ten_minutes_apart_share_jobs_leases_and_leadership(
        daemon_factory, conn, marks):
    """One host ten minutes ahead, one ten minutes behind, one database:
    one leader at a time and a stable term, delayed jobs run at the
    database's time (not ten minutes early or late), jobs longer than the
    lease are renewed and never reaped, a retry backs off as configured."""
    config = {"worker": {"lease_ttl": 2}}
    daemons = {"ahead": daemon_factory("ahead", workers=2, config=config, env=skewed(SKEW_S)),
               "behind": daemon_factory("behind", workers=2, config=config,
                                        env=skewed(-SKEW_S))}
    for d in daemons.values():
        d.start()
    for d in daemons.values():
        d.wait_ready()
    leader = wait_until(lambda: conn.execute("SELECT leader_id, term FROM pulse_leader"
                                             " WHERE expires_at > now()").fetchone(),
                        timeout=15, message="a leader")
    with conn.transaction():
        long_ids = [pulsed.enqueue(conn, "sleep", {"s": 5, "dir": str(marks)})
                    for _ in range(3)]
        delayed_ids = [pulsed.enqueue(conn, "noop", {"dir": str(marks)}, delay=3)
                       for _ in range(6)]
        retry_id = pulsed.enqueue(conn, "async_fail_first", {"dir": str(marks)})
    ids = long_ids + delayed_ids + [retry_id]

    def all_done() -> bool:
        return conn.execute("SELECT count(*) FROM pulse_jobs WHERE id = ANY(%s)"
                            " AND state = 'completed'", (ids,)).fetchone()[0] == len(ids)
    wait_until(all_done, timeout=30, interval=0.2, message=lambda: "every job completed\n"
               + daemons["ahead"].log_tail() + daemons["behind"].log_tail())
    # One leader all along: the lease never changed hands.
    assert conn.execute("SELECT leader_id, term FROM pulse_leader").fetchone() == tuple(leader)
    for job_id in long_ids:  # renewed, never reaped
        attempt, = conn.execute("SELECT attempt FROM pulse_jobs WHERE id = %s",
                                (job_id,)).fetchone()
        assert attempt == 1, f"job {job_id} ran {attempt} times: its lease was reaped"
        assert len(list(marks.glob(f"{job_id}.*.start"))) == 1
    for job_id in delayed_ids:
        early, = conn.execute("SELECT EXTRACT(EPOCH FROM started_at - run_at)::float8"
                              " FROM pulse_jobs WHERE id = %s", (job_id,)).fetchone()
        assert 0 <= early < 3, f"delayed job {job_id} started {early:.1f}s after its run_at"
    attempt, gap = conn.execute(
        "SELECT j.attempt, EXTRACT(EPOCH FROM j.started_at - a.finished_at)::float8"
        " FROM pulse_jobs j JOIN pulse_job_attempts a ON a.job_id = j.id AND a.attempt = 1"
        " WHERE j.id = %s", (retry_id,)).fetchone()
    assert attempt == 2
    assert 1.5 - 0.5 <= gap <= 2.5 + 2, f"retry backed off {gap:.1f}s, not ~2s"


@pytest.mark.parametrize("skew", [SKEW_S, -SKEW_S])
def test_job_wait_seconds_of_a_skewed_worker_is_the_database_time(daemon_factory, conn, skew):
    """pulse_job_wait_seconds was the host's time.time() at the handler's
    start minus the job's run_at (the database's): ten minutes per job on a
    host ahead, 0 (clamped) on one behind. The wait is the database's
    started_at - run_at."""
    from tests.system.test_observability import ApiDaemon, total
    from tests.system.daemon import free_port
    port = free_port()
    config = {"api": {"enabled": True, "listen": f"127.0.0.1:{port}"}}
    daemon = daemon_factory("skewed", workers=1, config=config, env=skewed(skew)).start()
    daemon.wait_ready()
    node = ApiDaemon(daemon, port)
    node.wait_healthy()
    with conn.transaction():
        ids = [pulsed.enqueue(conn, "work", {"s": 0.0}) for _ in range(3)]
        due, = conn.execute("SELECT now() - interval '2 seconds'").fetchone()
        ids.append(pulsed.enqueue(conn, "work", {"s": 0.0}, run_at=due))  # waited 2 s
    wait_until(lambda: total(node.metrics(), "pulse_job_wait_seconds_count", type="work") == 4,
               timeout=20, message=lambda: f"4 waits observed\n{daemon.log_tail()}")
    waited, = conn.execute("SELECT sum(EXTRACT(EPOCH FROM started_at - run_at))::float8"
                           " FROM pulse_jobs WHERE id = ANY(%s)", (ids,)).fetchone()
    observed = total(node.metrics(), "pulse_job_wait_seconds_sum", type="work")
    assert abs(observed - waited) < 1.0, f"observed {observed:.1f}s of waits, the database {waited:.1f}s"


def test_progress_of_a_skewed_worker_is_stamped_on_the_database_time(daemon_factory, conn,
                                                                       marks):
    """A progress report's `at` was the worker host's time.time(): ten
    minutes off the run_at and started_at `pulsectl job` shows beside it."""
    daemon = daemon_factory("skewed", workers=1, env=skewed(SKEW_S)).start()
    daemon.wait_ready()
    job_id = pulsed.enqueue(conn, "reports_progress", {"dir": str(marks)})
    wait_until(lambda: (marks / f"{job_id}.1.start").exists() or any(
        p.name.startswith(f"{job_id}.") for p in marks.iterdir()), timeout=30,
        message=lambda: f"the job never started\n{daemon.log_tail()}")
    wait_until(lambda: conn.execute("SELECT progress->>'message' FROM pulse_jobs WHERE id = %s",
                                    (job_id,)).fetchone()[0] == "halfway", timeout=15,
               message=lambda: f"no progress written\n{daemon.log_tail()}")
    off, = conn.execute("SELECT abs(EXTRACT(EPOCH FROM (progress->>'at')::timestamptz - now()))"
                        "::float8 FROM pulse_jobs WHERE id = %s", (job_id,)).fetchone()
    (marks / "release").touch()
    assert off < 60, f"the report's time is {off:.0f}s off the database's"
