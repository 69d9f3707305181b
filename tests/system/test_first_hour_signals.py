"""Issue 24, item 9, on real daemons: a second Ctrl-C stops now, a job
killed at the stop deadline reads as interrupted in the log too, handler
output names its job, the start-up log names the database (no password),
and `pulsed --migrate` says when there is nothing to do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pulsed
from tests.pg import wait_until
from tests.system.daemon import REPO

pytestmark = pytest.mark.timeout(120)

LONG_STOP_TIMEOUT = 60  # seconds: far longer than any wait below
QUICK_EXIT_S = 20  # a fast stop's bound, with room for a loaded machine


def started(marks, job_id: int) -> bool:
    return any(name.startswith(f"{job_id}.") and name.endswith(".start")
               for name in os.listdir(marks))


def test_a_second_ctrl_c_stops_now(daemon_factory, conn, marks):
    daemon = daemon_factory(workers=1, config={
        "daemon": {"stop_timeout": LONG_STOP_TIMEOUT}}).start()
    daemon.wait_ready()
    job_id = pulsed.enqueue(conn, "sleep", {"s": LONG_STOP_TIMEOUT * 2, "dir": str(marks)})
    wait_until(lambda: started(marks, job_id), timeout=30, message="the job never started")
    daemon.signal(signal.SIGINT)
    wait_until(lambda: "stopping: running jobs get" in daemon.log_text(), timeout=10,
               message=f"the first SIGINT did not start a graceful stop:\n{daemon.log_tail()}")
    began = time.monotonic()
    daemon.signal(signal.SIGINT)
    daemon.wait_exit(timeout=QUICK_EXIT_S)
    assert time.monotonic() - began < QUICK_EXIT_S
    assert "interrupted again: stopping now" in daemon.log_text()


def test_a_job_killed_at_the_stop_deadline_reads_as_interrupted(daemon_factory, conn, marks):
    daemon = daemon_factory(workers=1, config={"daemon": {"stop_timeout": 1}}).start()
    daemon.wait_ready()
    job_id = pulsed.enqueue(conn, "hang", {"dir": str(marks)})
    wait_until(lambda: started(marks, job_id), timeout=30, message="the job never started")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=30) == 0
    line = next(line for line in daemon.log_text().splitlines()
                if "master.loop: worker" in line and "SIGKILL" in line)
    assert "at the stop deadline" in line and "interrupted" in line, line
    assert " WARNING " not in line, line
    outcome = conn.execute("SELECT outcome FROM pulse_job_attempts WHERE job_id = %s",
                           (job_id,)).fetchone()
    assert outcome == ("interrupted",)


def with_password(dsn: str, password: str) -> str:
    return make_conninfo(dsn, password=password)


def test_handler_output_names_its_job_and_the_log_names_the_database(
        daemon_factory, dsn, conn, marks):
    secret = "not-for-the-log"
    url = with_password(dsn, secret)  # trust auth: the password is never checked
    daemon = daemon_factory(workers=1, config={"database": {"url": url}}).start()
    daemon.wait_ready()
    job_id = pulsed.enqueue(conn, "say", {"text": "hello from a handler", "dir": str(marks)})
    wait_until(lambda: f"[say#{job_id}] on stderr too" in daemon.log_text(), timeout=30,
               message=f"no tagged handler output:\n{daemon.log_tail()}")
    assert f"[say#{job_id}] hello from a handler" in daemon.log_text()
    info = conninfo_to_dict(dsn)
    assert "database: " in daemon.log_text() and info["dbname"] in daemon.log_text()
    assert secret not in daemon.log_text()


def test_migrate_says_when_the_schema_is_current(dsn, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PULSE_DATABASE_URL": dsn,
           "PULSE_DAEMON_STATE_DIR": str(tmp_path / "state")}
    done = subprocess.run([sys.executable, "-m", "pulsed", "--migrate"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "the schema is up to date" in done.stderr, done.stderr
