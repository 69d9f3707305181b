"""pulsectl against a real daemon: scale, drain, resume, garbage, status."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psycopg
import pytest

import pulsed
from pulsed.db.store import Store
from tests.pg import wait_until

pytestmark = pytest.mark.timeout(120)


def pulsectl(daemon, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pulsectl", "--config", str(daemon.config_path), *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "COLUMNS": "100"})


def _state(conn: psycopg.Connection, job_id: int) -> str:
    return Store(conn).get_job(job_id, with_attempts=False).state.value


def _busy_workers(daemon) -> int:
    return sum(1 for t in daemon.workers().values() if "[busy" in t)


def test_scale_up_then_down_stops_idle_workers_first(daemon_factory, conn, marks):
    daemon = daemon_factory(workers=2).start()
    daemon.wait_ready()
    result = pulsectl(daemon, "scale", "workers=5")
    assert result.returncode == 0, result.stderr
    daemon.wait_ready(workers=5)

    job_ids = [pulsed.enqueue(conn, "sleep", {"s": 3, "dir": str(marks)}) for _ in range(2)]
    wait_until(lambda: _busy_workers(daemon) == 2, timeout=10)
    busy = {p for p, t in daemon.workers().items() if "[busy" in t}

    result = pulsectl(daemon, "scale", "workers=-3")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(daemon.workers()) == 2, timeout=10,
               message="scale down did not stop three workers")
    assert set(daemon.workers()) == busy, "a busy worker was stopped before idle ones"
    for job_id in job_ids:
        wait_until(lambda: _state(conn, job_id) == "completed", timeout=10)
    assert pulsectl(daemon, "scale", "workers=banana").returncode == 2  # usage
    refused = pulsectl(daemon, "scale", "workers=-99")  # the daemon refuses it
    assert refused.returncode == 1 and "invalid_argument" in refused.stderr


def test_a_worker_forked_after_start_up_inherits_the_masters_metrics(daemon_factory, conn,
                                                                      marks):
    """A worker started into waiting jobs (a scale-up, a crashed worker's
    successor) never waits idle before its first job, so it imported
    prometheus_client on that job's way out (15-80 ms, holding up the jobs
    claimed with it). The master builds the metrics once it is up."""
    daemon = daemon_factory(workers=1).start()
    daemon.wait_ready()
    busy = pulsed.enqueue(conn, "sleep", {"s": 5, "dir": str(marks)})
    wait_until(lambda: _state(conn, busy) == "running", timeout=10)
    waiting = pulsed.enqueue(conn, "metrics_inherited", {"dir": str(marks)})
    result = pulsectl(daemon, "scale", "workers=2")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: _state(conn, waiting) == "completed", timeout=10)
    assert [p.name.rsplit(".", 1)[1] for p in marks.glob(f"{waiting}.*")] == ["inherited"]


def test_drain_wait_returns_after_running_jobs_and_resume_restarts_claims(
        daemon_factory, conn, marks):
    daemon = daemon_factory(workers=2).start()
    daemon.wait_ready()
    running = pulsed.enqueue(conn, "sleep", {"s": 2, "dir": str(marks)})
    wait_until(lambda: _state(conn, running) == "running", timeout=10)

    result = pulsectl(daemon, "drain", "--wait", "--timeout", "30")
    assert result.returncode == 0, result.stderr
    assert _state(conn, running) == "completed"  # drain --wait returned after it finished
    assert daemon.status()["master"]["state"] == "drained"

    waiting = pulsed.enqueue(conn, "noop", {"dir": str(marks)})
    # A drained node survives a restart of its workers still drained.
    os.kill(next(iter(daemon.workers())), signal.SIGKILL)
    wait_until(lambda: len(daemon.workers()) == 2, timeout=10)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:  # a window in which a claim would show
        assert _state(conn, waiting) == "available"
        time.sleep(0.1)

    assert pulsectl(daemon, "resume").returncode == 0
    wait_until(lambda: _state(conn, waiting) == "completed", timeout=10)
    assert daemon.status()["master"]["state"] == "running"


def test_garbage_on_the_socket_leaves_the_daemon_serving(daemon_factory):
    daemon = daemon_factory(workers=1).start()
    daemon.wait_ready()
    path = str(daemon.socket_path)

    def send(payload: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(path)
            try:
                sock.sendall(payload)
                return sock.recv(65536)
            except OSError:
                return b""

    assert b"bad_request" in send(b"\x00\xff\xfe garbage \x80\n")
    assert b"bad_request" in send(b"[" * 100_000 + b"\n")
    assert b"unknown_command" in send(b'{"cmd": "format_disk"}\n')
    assert b"invalid_argument" in send(b'{"cmd": "scale", "workers": {"a": 1}}\n')
    assert send(b"x" * (8 * 1024 * 1024)) in (b"",) or b"too long" in send(b"y" * (1 << 20))
    for _ in range(100):  # opened and dropped
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        sock.sendall(b'{"cmd": "sta')
        sock.close()
    status = daemon.status()
    assert status["master"]["state"] == "running"
    assert daemon.proc.poll() is None


def test_status_when_daemon_is_down_exits_3_naming_the_socket(tmp_path):
    missing = tmp_path / "nowhere.sock"
    result = subprocess.run([sys.executable, "-m", "pulsectl", "--socket", str(missing),
                             "status"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 3
    assert str(missing) in result.stderr


def test_status_shows_busy_workers_in_a_terminal_and_as_json(daemon_factory, conn, marks):
    daemon = daemon_factory(workers=3).start()
    daemon.wait_ready()
    for _ in range(3):
        pulsed.enqueue(conn, "sleep", {"s": 4, "dir": str(marks)})
    pulsed.enqueue_many(conn, [{"type": "noop", "payload": {}}] * 5)
    wait_until(lambda: _busy_workers(daemon) == 3, timeout=10)
    wait_until(lambda: any(q["type"] == "noop" for q in daemon.status()["queues"]), timeout=5)

    text = pulsectl(daemon, "status")
    assert text.returncode == 0, text.stderr
    assert "worker" in text.stdout and "busy" in text.stdout and "sleep#" in text.stdout
    print(text.stdout)  # the terminal rendering, for the issue note

    data = json.loads(pulsectl(daemon, "status", "--json").stdout)
    assert {"master", "leader", "children", "queues", "oldest_available_age_s"} <= set(data)
    assert data["master"]["node_id"] == "node-a"
    assert data["leader"]["is_me"] is True and data["leader"]["term"] >= 1
    busy = [c for c in data["children"] if c["state"] == "busy"]
    assert len(busy) == 3 and all(isinstance(c["job"], int) for c in busy)
    for child in data["children"]:
        assert {"role", "index", "pid", "state", "job", "jobs_done", "restarts",
                "rss_bytes"} <= set(child)
        assert child["rss_bytes"] > 0
