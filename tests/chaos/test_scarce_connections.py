"""Scarce connection slots (issue 23 item 1): a private server with
max_connections 20 (3 reserved for superusers), Pulse connecting as an
ordinary role.

- 16 workers and the scheduler take all 17 ordinary slots; 16 jobs of 12 s
  with lease_ttl 5 must keep their leases (renewed on each worker's own
  connection) and complete on their first attempt, none `lease_expired`.
  Before the keeper renewed on the worker's connection it needed a second
  one: 48 starts, 48 lease_expired, all 16 failed.
- A worker that cannot get a connection at all says so: `db_ok` false and
  the error in status, and it recovers by itself once a slot frees up.
"""

from __future__ import annotations

import time

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pulsed.control.client import ControlClient
from pulsed.worker import DB_UNREACHABLE_AFTER_S
from tests.chaos.harness import (SCARCE_MAX_CONNECTIONS, SCARCE_RESERVED, account,
                                 accounting_fields, check_accounting, enqueue_load, query,
                                 scarce_server, settle)
from tests.pg import wait_until

pytestmark = pytest.mark.timeout(120)

MAX_CONNECTIONS, RESERVED = SCARCE_MAX_CONNECTIONS, SCARCE_RESERVED
WORKERS = 16
JOBS = 16
JOB_S = 12.0
LEASE_TTL = 5


def test_sixteen_workers_keep_their_leases_on_the_last_free_slots(private_pg, daemons_on, marks,
                                                                  record):
    pg, app_dsn, super_dsn = scarce_server(private_pg)
    daemon = daemons_on(app_dsn, workers=WORKERS,
                        config={"worker": {"lease_ttl": LEASE_TTL}}).start()
    daemon.wait_ready(timeout=40)
    ids = enqueue_load(super_dsn, JOBS, "sleep", s=JOB_S, dir=str(marks))
    with psycopg.connect(super_dsn, autocommit=True) as conn:
        conn.execute("UPDATE pulse_jobs SET max_attempts = 3")
    started = time.monotonic()
    took = settle(super_dsn, ids, timeout=JOB_S * 3 + 15)
    acc = account(super_dsn, ids, marks)
    expired = query(super_dsn, "SELECT count(*) FROM pulse_job_attempts "
                               "WHERE outcome = 'lease_expired'")[0][0]
    attempts = query(super_dsn, "SELECT max(attempt) FROM pulse_jobs")[0][0]
    slots = query(super_dsn, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'pulse'")[0][0]
    record(fault=f"connection slots scarce: max_connections {MAX_CONNECTIONS} "
                 f"({RESERVED} reserved), {WORKERS} workers and the scheduler on the "
                 f"{MAX_CONNECTIONS - RESERVED} ordinary slots",
           load=f"{JOBS} jobs x {JOB_S:g} s, lease_ttl {LEASE_TTL} s, max_attempts 3",
           recovery_s=None, lease_expired=expired, most_attempts=attempts,
           pulse_connections=slots, all_done_s=round(time.monotonic() - started, 1),
           settle_s=round(took, 3), **accounting_fields(acc))
    check_accounting(acc, "16 long jobs on scarce connections")
    assert acc.completed == JOBS and acc.duplicates == 0
    assert expired == 0, f"{expired} lease_expired attempts; log:\n{daemon.log_tail()}"
    assert attempts == 1


def _hog_every_slot(dsn: str) -> list[psycopg.Connection]:
    held: list[psycopg.Connection] = []
    while len(held) < MAX_CONNECTIONS:
        try:
            held.append(psycopg.connect(dsn, autocommit=True, application_name="chaos hog"))
        except psycopg.OperationalError:
            break
    return held


def _workers(daemon) -> list[dict]:
    return [c for c in daemon.status()["children"] if c["role"] == "worker" and c["pid"]]


def test_a_worker_that_cannot_connect_says_so_and_recovers(private_pg, daemons_on, record):
    pg, app_dsn, super_dsn = scarce_server(private_pg)
    daemon = daemons_on(app_dsn, workers=2).start()
    daemon.wait_ready()
    hog = _hog_every_slot(make_conninfo(pg.admin_dsn("pulse_app"), user="hog"))
    try:
        ControlClient(daemon.socket_path).request("scale", workers=3)
        cut_off = wait_until(
            lambda: [c for c in _workers(daemon) if c.get("db_ok") is False],
            timeout=DB_UNREACHABLE_AFTER_S + 15,
            message=f"a worker without a connection shown db_ok false; log:\n{daemon.log_tail()}")
        shown_after = time.monotonic()
        assert len(cut_off) == 1 and cut_off[0]["index"] == 3
        assert cut_off[0]["error"].startswith("no database for "), cut_off[0]
        assert "too many clients" in cut_off[0]["error"] or "reserved" in cut_off[0]["error"]
        assert cut_off[0]["restarts"] == 0, "the worker crashed instead of waiting"
    finally:
        for conn in hog:
            conn.close()
    released = time.monotonic()
    wait_until(lambda: len(_workers(daemon)) == 3
               and all(c["db_ok"] and c["error"] is None for c in _workers(daemon)),
               timeout=15, message="the worker recovered by itself")
    record(fault="a worker that cannot get a connection (every ordinary slot held, scaled 2 -> 3)",
           load="no jobs", lost=0, stuck=0, duplicates=0,
           recovery_s=time.monotonic() - released,
           shown_in_status=cut_off[0]["error"][:80], restarts=cut_off[0]["restarts"],
           held_slots=len(hog), shown_for_s=round(released - shown_after, 1))
