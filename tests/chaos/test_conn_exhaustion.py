"""Connection exhaustion: a private server with max_connections 20 (3 of
them reserved for superusers); Pulse connects as an ordinary role. Another
client takes every ordinary slot but one, then Pulse needs more connections
(scaled from 2 to 5 workers, and one worker killed so the master must
release its leases and respawn it). Pulse degrades without spinning (its
refused connection attempts per second stay low), status answers
throughout, and once the slots free up every worker connects and every
job completes."""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.chaos.harness import (SCARCE_MAX_CONNECTIONS, SCARCE_RESERVED, Feeder, StatusWatch,
                                 account, accounting_fields, check_accounting,
                                 completions_between, crash_lines, log_count, now_utc, query,
                                 scarce_server, settle)
from tests.pg import wait_until
from tests.system.daemon import pid_alive

pytestmark = pytest.mark.timeout(240)

MAX_CONNECTIONS, RESERVED = SCARCE_MAX_CONNECTIONS, SCARCE_RESERVED
LEASE_TTL = 5
REFUSED = ("too many clients already", "remaining connection slots are reserved")
# Five workers, a lease keeper each, the scheduler and the master, each
# backing off: a few attempts a second at most. A spin would be hundreds.
MAX_REFUSED_PER_S = 5.0
MAX_LOG_LINES_PER_S = 20.0  # warnings and errors


def _pulse_workers_connected(admin: str) -> int:
    rows = query(admin, "SELECT count(*) FROM pg_stat_activity "
                        "WHERE application_name LIKE 'pulse worker%%'")
    return rows[0][0] if rows else 0


def _hog(dsn: str, leave_free: int) -> list[psycopg.Connection]:
    """Take every ordinary connection slot, then give `leave_free` back."""
    held: list[psycopg.Connection] = []
    for _ in range(MAX_CONNECTIONS):
        try:
            held.append(psycopg.connect(dsn, autocommit=True, application_name="chaos hog"))
        except psycopg.OperationalError:
            break
    for _ in range(leave_free):
        held.pop().close()
    return held


@pytest.mark.parametrize("seconds", [10, pytest.param(30, marks=pytest.mark.slow, id="long")])
def test_connection_exhaustion_degrades_without_spinning(private_pg, daemons_on, marks, record,
                                                         seconds):
    pg, app_dsn, super_dsn = scarce_server(private_pg)
    admin = pg.admin_dsn("postgres")

    daemon = daemons_on(app_dsn, workers=2, config={"worker": {"lease_ttl": LEASE_TTL}}).start()
    daemon.wait_ready()
    feeder = Feeder(super_dsn, 50, s=0.004, dir=str(marks))
    feeder.start()
    watch = StatusWatch(daemon)
    watch.start()
    time.sleep(1.5)

    hog = _hog(make_conninfo(admin, user="hog"), leave_free=1)
    fault_start, wall_start = now_utc(), time.time()
    daemon.status()  # the control socket needs no database
    from pulsed.control.client import ControlClient
    ControlClient(daemon.socket_path).request("scale", workers=5)
    victim = next(iter(daemon.workers()))
    os.kill(victim, signal.SIGKILL)
    time.sleep(seconds)
    degraded = {"workers_connected": _pulse_workers_connected(admin),
                "child_states": dict(watch.states), "snapshot_age_s":
                watch.last.get("snapshot_age_s")}
    wall_end = time.time()
    released = now_utc()
    for conn in hog:
        conn.close()

    recovered = wait_until(lambda: _pulse_workers_connected(admin) >= 5 and time.monotonic(),
                           timeout=30, interval=0.05,
                           message=f"all 5 workers connected after the slots freed up; "
                                   f"log:\n{daemon.log_tail()}")
    recovery_s = (now_utc() - released).total_seconds()
    time.sleep(1)
    ids = feeder.stop()
    took = settle(super_dsn, ids, timeout=60 + LEASE_TTL)
    watch.stop()
    acc = account(super_dsn, ids, marks)

    refused = sum(log_count(pg.log_path, text, wall_start, wall_end, utc=True) for text in REFUSED)
    log_lines = sum(log_count(daemon.log_path, level, wall_start, wall_end)
                    for level in (" WARNING ", " ERROR ")) / (wall_end - wall_start)
    record(fault=f"connection slots exhausted ({len(hog)} of {MAX_CONNECTIONS - RESERVED} "
                 f"ordinary slots held) for {seconds}s",
           load="50 jobs/s x 4 ms, 2 then 5 workers", recovery_s=recovery_s,
           refused_per_s=round(refused / (wall_end - wall_start), 2),
           warnings_per_s=round(log_lines, 2),
           completed_per_s_during=round(completions_between(
               super_dsn, ids, fault_start, released) / seconds, 1),
           status_polls=watch.polls, status_failures=len(watch.failures),
           status_slowest_s=round(watch.slowest, 3), degraded=degraded, settle_s=round(took, 3),
           restarts=watch.restarts, expected_restarts=1, **accounting_fields(acc))
    assert recovered

    check_accounting(acc, "after connection exhaustion")
    assert refused / (wall_end - wall_start) <= MAX_REFUSED_PER_S, (
        f"Pulse spun on connecting: {refused} refused attempts in {wall_end - wall_start:.1f}s")
    assert log_lines <= MAX_LOG_LINES_PER_S, f"{log_lines:.1f} warnings a second in the log"
    assert pid_alive(daemon.pid) and watch.master_pids <= {daemon.pid}
    assert not watch.failures, f"status did not answer: {watch.failures[:3]}"
    assert watch.slowest < 2, f"a status reply took {watch.slowest:.1f}s"
    assert watch.total_restarts <= 1, (  # the worker the test killed
        f"children restarted {watch.restarts}; log:\n{crash_lines(daemon)}")
