"""pulsed started while its database is down (issue 23, smaller ones): it
retries with backoff for database.start_wait, saying so, and starts once the
server is up; a server that stays away makes it exit with its own status
(69, EX_UNAVAILABLE) and a message naming the setting. It used to exit 1
in 0.3 s."""

from __future__ import annotations

import time

import pytest

from pulsed.errors import EXIT_DATABASE_UNREACHABLE
from tests.pg import wait_until
from tests.system.daemon import free_port

pytestmark = pytest.mark.timeout(120)


def test_a_database_that_stays_down_ends_the_start_with_its_own_status(daemons_on, record):
    dsn = f"postgresql://pulse@127.0.0.1:{free_port()}/pulse"  # nothing listens there
    daemon = daemons_on(dsn, config={"database": {"start_wait": 2}}).start()
    started = time.monotonic()
    code = daemon.wait_exit(timeout=30)
    took = time.monotonic() - started
    log = daemon.log_text()
    assert code == EXIT_DATABASE_UNREACHABLE, log
    assert took >= 2, f"gave up after {took:.1f}s"
    assert "cannot reach the database yet" in log and "retrying in" in log
    assert "giving up after 2s (database.start_wait)" in log
    assert "Traceback" not in log
    record(fault="database down at pulsed's start and for good (database.start_wait 2 s)",
           load="no jobs", lost=0, stuck=0, duplicates=0, recovery_s=None,
           exit_status=code, gave_up_after_s=round(took, 2),
           retries=log.count("cannot reach the database yet"))


def test_pulsed_waits_for_a_database_that_comes_up(private_pg, daemons_on, record):
    pg = private_pg()
    pg.stop()
    daemon = daemons_on(pg.dsn, workers=1).start()
    wait_until(lambda: "cannot reach the database yet" in daemon.log_text(), timeout=20,
               message="pulsed saying it waits for the database")
    assert daemon.proc.poll() is None, daemon.log_text()
    pg.start()
    back = time.monotonic()
    daemon.wait_ready(timeout=30)
    record(fault="database down at pulsed's start, started once pulsed said it waits",
           load="no jobs", lost=0, stuck=0, duplicates=0,
           recovery_s=time.monotonic() - back, exit_status=None)
