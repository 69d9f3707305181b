"""Hosts whose wall clock disagrees with the database server's (NTP broken,
a VM resumed from a snapshot). PostgreSQL's now() is the one clock for
shared state: a daemon minutes ahead or behind must promote, lease, reap,
lead and fire cron ticks on the database's time, not its own.

The skewed daemons run under libfaketime. Its FAKETIME_DONT_FAKE_MONOTONIC=1
makes time.sleep() fail with EINVAL (libfaketime 0.9.10 and its absolute
clock_nanosleep), so the monotonic clock is moved by the same constant:
durations measured on it stay right, as on a real host whose NTP is broken.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from tests.pg import wait_until
from tests.system.daemon import Daemon
from tests.system.test_scheduler_cluster import with_cron

pytestmark = pytest.mark.timeout(90)

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
SKEW_S = 600  # ten minutes

if not FAKETIME_LIB.exists():
    pytest.skip(f"libfaketime is not installed ({FAKETIME_LIB})", allow_module_level=True)


def skewed(seconds: int) -> dict[str, str]:
    """The environment of a process whose wall clock is `seconds` off."""
    return {"LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": f"{seconds:+d}"}


def test_faketime_moves_the_wall_clock_and_keeps_durations():
    """The harness itself: a child under skewed() sees its wall clock ten
    minutes ahead, sleeps, and measures the sleep right."""
    code = ("import time; t = time.monotonic(); time.sleep(0.2); "
            "print(time.time(), time.monotonic() - t)")
    out = subprocess.run(["python3", "-c", code], env={**os.environ, **skewed(SKEW_S)},
                         capture_output=True, text=True, check=True)
    wall, slept = (float(v) for v in out.stdout.split())
    assert abs(wall - time.time() - SKEW_S) < 5
    assert 0.15 < slept < 1.0


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
