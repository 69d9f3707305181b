"""The real daemon under defaults a DBA or a host sets on Pulse's database
(ALTER DATABASE ... SET), which every session of Pulse inherits unless it
pins its own value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pulsed
from tests.integration.test_database_settings import alter_database
from tests.pg import wait_until
from tests.system.daemon import Daemon, free_port
from tests.system.test_observability import ApiDaemon
from tests.system.test_scheduler_cluster import with_cron

pytestmark = pytest.mark.timeout(120)


def pulsectl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pulsectl", "--config", str(daemon.config_path), *args],
        capture_output=True, text=True, timeout=60)


def job_state(conn: psycopg.Connection, job_id: int) -> str:
    return conn.execute("SELECT state::text FROM pulse_jobs WHERE id = %s", (job_id,)).fetchone()[0]


@pytest.mark.parametrize("datestyle", ["SQL, DMY", "German", "Postgres, MDY"])
def test_a_database_datestyle_other_than_iso_breaks_nothing(
        daemon_factory: Any, dsn: str, conn: psycopg.Connection, marks: Path,
        datestyle: str) -> None:
    """psycopg reads a timestamptz only in DateStyle ISO: the scheduler
    crash-looped on its first cron tick, and pulsectl jobs, GET /jobs/{id}
    and the worker's claims failed on the first timestamp they read."""
    alter_database(dsn, DateStyle=datestyle)
    port = free_port()
    daemon = daemon_factory(config={"api": {"enabled": True, "listen": f"127.0.0.1:{port}"}})
    with_cron(daemon, [{"name": "tick", "type": "noop", "every": 1,
                        "payload": {"dir": str(marks)}}])
    daemon.start().wait_ready()
    node = ApiDaemon(daemon, port)
    node.wait_healthy()

    job_id = pulsed.enqueue(conn, "noop", {})
    wait_until(lambda: job_state(conn, job_id) == "completed", timeout=30,
               message=lambda: f"the job never completed; log:\n{daemon.log_tail()}")
    wait_until(lambda: len(list(marks.glob("*.done"))) >= 2, timeout=30,
               message=lambda: f"the cron entry never ran twice; log:\n{daemon.log_tail()}")

    status, _, body = node.get(f"/jobs/{job_id}")
    assert status == 200, body
    created = conn.execute("SELECT created_at FROM pulse_jobs WHERE id = %s",
                           (job_id,)).fetchone()[0]
    assert json.loads(body)["created_at"] == created.isoformat()
    for args in (["--json", "jobs"], ["--json", "job", str(job_id)], ["--json", "status"]):
        done = pulsectl(daemon, *args)
        assert done.returncode == 0, f"pulsectl {args}: {done.stderr}"
    shown = json.loads(pulsectl(daemon, "--json", "job", str(job_id)).stdout)
    assert shown["state"] == "completed"
    assert [c["restarts"] for c in daemon.status()["children"]] == [0] * len(
        daemon.status()["children"]), daemon.log_tail()
    assert "Traceback" not in daemon.log_text()


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
def test_a_database_isolation_above_read_committed_costs_no_serialization_failure(
        daemon_factory: Any, dsn: str, conn: psycopg.Connection, marks: Path,
        isolation: str) -> None:
    """Two daemons of three workers claiming side by side: under a default
    of repeatable read or serializable their claims and completions failed
    with 'could not serialize access', and each worker dropped its
    connection, backed off and gave its jobs back as for a lost database."""
    alter_database(dsn, default_transaction_isolation=isolation)
    daemons = [daemon_factory(name, workers=3).start() for name in ("a", "b")]
    for daemon in daemons:
        daemon.wait_ready()
    ids = pulsed.enqueue_many(conn, [{"type": "noop", "payload": {"dir": str(marks)}}
                                     for _ in range(600)])
    ids += pulsed.enqueue_many(conn, [{"type": "boom", "max_attempts": 2} for _ in range(20)])

    def unfinished() -> int:
        return conn.execute("SELECT count(*) FROM pulse_jobs WHERE state NOT IN "
                            "('completed', 'failed')").fetchone()[0]

    wait_until(lambda: unfinished() == 0, timeout=90,
               message=lambda: f"{unfinished()} jobs unfinished; log:\n{daemons[0].log_tail()}")
    assert conn.execute("SELECT state::text, attempt, count(*) FROM pulse_jobs "
                        "GROUP BY 1, 2 ORDER BY 1").fetchall() == [("completed", 1, 600),
                                                                   ("failed", 2, 20)]
    assert len(list(marks.glob("*.done"))) == 600  # each ran once
    for daemon in daemons:
        log = daemon.log_text()
        assert "could not serialize" not in log and "connection lost" not in log, \
            daemon.log_tail()


def test_a_read_only_database_default_stops_pulsed_at_start_saying_which_setting(
        daemon_factory: Any, dsn: str) -> None:
    alter_database(dsn, default_transaction_read_only="on")
    daemon = daemon_factory().start()
    assert daemon.wait_exit(timeout=30) == 1
    log = daemon.log_text()
    assert "default_transaction_read_only is on" in log, log
    assert "Traceback" not in log and not daemon.children()
