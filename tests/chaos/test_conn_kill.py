"""Connections killed under load: pg_terminate_backend of Pulse's backends
(application_name LIKE 'pulse%' in this test's database) several times a
second while a feeder keeps jobs coming. Every job still completes, none is
left running, and the daemon reconnects instead of crash-looping."""

from __future__ import annotations

import random
import threading
import time

import psycopg
import pytest

from tests.chaos.harness import (Feeder, StatusWatch, account, accounting_fields,
                                 assert_daemon_healthy, check_accounting, completion_gaps,
                                 completions_between, first_completion_after, now_utc, settle)

pytestmark = pytest.mark.timeout(240)

LEASE_TTL = 5
WORKERS = 3
KILLS_PER_S = 4
FEED_PER_S = 100

PULSE_BACKENDS = """
    SELECT pid, application_name FROM pg_stat_activity
    WHERE datname = current_database() AND application_name LIKE 'pulse%%'
      AND pid <> pg_backend_pid()
"""


class Killer(threading.Thread):
    """Terminates one random Pulse backend every 1/rate seconds."""

    def __init__(self, dsn: str, rate: float) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.dsn, self.rate = dsn, rate
        self.killed: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, application_name="chaos killer") as conn:
            while not self._halt.wait(1 / self.rate):
                backends = conn.execute(PULSE_BACKENDS).fetchall()
                if backends:
                    pid, name = random.choice(backends)
                    if conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]:
                        self.killed.append(name)

    def stop(self) -> list[str]:
        self._halt.set()
        self.join(timeout=10)
        return self.killed


@pytest.mark.parametrize("seconds", [8, pytest.param(20, marks=pytest.mark.slow, id="long")])
def test_connections_killed_under_load(daemon_factory, dsn, marks, record, seconds):
    daemon = daemon_factory(workers=WORKERS, config={"worker": {"lease_ttl": LEASE_TTL}}).start()
    daemon.wait_ready()
    feeder = Feeder(dsn, FEED_PER_S, s=0.004, dir=str(marks))
    feeder.start()
    watch = StatusWatch(daemon)
    watch.start()
    time.sleep(2)  # steady state before the fault: the baseline rate

    killer = Killer(dsn, KILLS_PER_S)
    fault_start = now_utc()
    killer.start()
    time.sleep(seconds)
    killed = killer.stop()
    fault_end = now_utc()
    time.sleep(1)
    ids = feeder.stop()

    took = settle(dsn, ids, timeout=30 + LEASE_TTL)
    watch.stop()
    acc = account(dsn, ids, marks)
    during = completions_between(dsn, ids, fault_start, fault_end) / seconds
    record(fault=f"pg_terminate_backend x{KILLS_PER_S}/s for {seconds}s",
           load=f"{FEED_PER_S} jobs/s x 4 ms, {WORKERS} workers",
           recovery_s=first_completion_after(dsn, ids, fault_end),
           longest_gap_s=round(completion_gaps(dsn, ids, fault_start, fault_end), 3),
           completed_per_s_during=round(during, 1), backends_killed=len(killed),
           killed_by_role={r: sum(1 for k in killed if k.startswith(r)) for r in
                           ("pulse worker", "pulse scheduler", "pulse lease keeper", "pulse master")},
           settle_s=round(took, 3), restarts=watch.restarts, **accounting_fields(acc))

    assert len(killed) >= seconds * KILLS_PER_S // 2, f"too few kills landed: {len(killed)}"
    check_accounting(acc, "after connections were killed")
    assert_daemon_healthy(daemon, watch)
