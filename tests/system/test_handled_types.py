"""Jobs of a type no worker handles: a real daemon leaves them waiting,
their attempts unused, while it runs the types it handles, and every
surface warns about them (pulsectl status and its JSON, the status page's
JSON, /metrics)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest

import pulsed
from pulsed.db.store import Store
from pulsed.jobs import JobState
from tests.pg import wait_until
from tests.promtool import promtool_check
from tests.system.daemon import free_port
from tests.system.test_observability import ApiDaemon, samples, total

pytestmark = pytest.mark.timeout(120)

ORPHAN = "nobody-handles-this"


def pulsectl(daemon: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pulsectl", "--config", str(daemon.config_path), *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})


def test_unhandled_types_wait_untouched_and_every_surface_warns(
        daemon_factory: Any, conn: psycopg.Connection) -> None:
    orphans = [pulsed.enqueue(conn, ORPHAN, priority=-1) for _ in range(3)]
    handled = [pulsed.enqueue(conn, "noop") for _ in range(5)]
    port = free_port()
    daemon = daemon_factory(config={"api": {"enabled": True, "listen": f"127.0.0.1:{port}"}})
    daemon.start().wait_ready()
    node = ApiDaemon(daemon, port)
    node.wait_healthy()
    store = Store(conn)

    wait_until(lambda: all(store.get_job(i, with_attempts=False).state is JobState.COMPLETED
                           for i in handled), timeout=30,
               message=f"the handled jobs never completed; log:\n{daemon.log_tail()}")
    expected = [{"type": ORPHAN, "count": len(orphans)}]
    wait_until(lambda: daemon.status().get("unhandled_types") == expected, timeout=30,
               message=f"status never listed {ORPHAN}: {daemon.status().get('unhandled_types')}")
    for job_id in orphans:
        record = store.get_job(job_id)
        assert record.state is JobState.AVAILABLE and record.attempt == 0, record
        assert not record.attempts

    shown = pulsectl(daemon, "status")
    assert shown.returncode == 0, shown.stderr
    assert "WARNING" in shown.stdout and f"{ORPHAN} (3)" in shown.stdout, shown.stdout
    as_json = pulsectl(daemon, "status", "--json")
    assert json.loads(as_json.stdout)["unhandled_types"] == expected, as_json.stdout

    page = json.loads(node.get("/status.json")[2])
    assert page["unhandled_types"] == expected, page
    text = node.get("/metrics")[2].decode()
    assert total(samples(text), "pulse_jobs_unhandled", type=ORPHAN) == len(orphans), text
    assert total(samples(text), "pulse_jobs_unhandled", type="noop") == 0
    promtool_check(text)
