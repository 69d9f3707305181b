"""Boot failures, chaos, signals, recycling and the systemd notify protocol."""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from pathlib import Path

import psycopg
import pytest

import pulsed
from tests.pg import wait_until

pytestmark = pytest.mark.timeout(120)


def _states(conn: psycopg.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT state::text, count(*) FROM pulse_jobs GROUP BY 1").fetchall())


def test_broken_handler_module_backs_off_and_reports_the_error(daemon_factory):
    daemon = daemon_factory(workers=2, config={
        "worker": {"handlers": ["tests.system.broken_jobs"]}}).start()
    wait_until(lambda: daemon.socket_path.exists(), timeout=10)
    time.sleep(10)  # observe a fixed window: how many restarts happen in it
    status = daemon.status()
    assert status["master"]["state"] == "running"
    assert daemon.proc.poll() is None, "the master must stay up"
    workers = [c for c in status["children"] if c["role"] == "worker"]
    assert len(workers) == 2
    for child in workers:
        assert child["restarts"] <= 6, f"worker restarted too often: {child}"
        assert "broken on purpose" in (child["error"] or ""), child
    assert any(c["state"] == "backoff" for c in workers) or all(
        c["restarts"] >= 3 for c in workers)
    # The scheduler is unaffected.
    scheduler = [c for c in status["children"] if c["role"] == "scheduler"]
    assert scheduler and scheduler[0]["restarts"] == 0


def test_chaos_kill_9_random_workers_loses_no_job(daemon_factory, conn, marks):
    daemon = daemon_factory(workers=3).start()
    daemon.wait_ready()
    ids = pulsed.enqueue_many(conn, [
        {"type": "sleep", "payload": {"s": 0.05, "dir": str(marks)}} for _ in range(300)])
    rng = random.Random(7)
    kills = 0
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:
        workers = list(daemon.workers())
        if workers:
            try:
                os.kill(rng.choice(workers), signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        time.sleep(0.7)  # the chaos cadence itself, not a wait for a condition
    assert kills >= 10
    wait_until(lambda: _states(conn).get("completed", 0) == 300, timeout=60,
               message=f"not every job completed: {_states(conn)}")
    states = _states(conn)
    assert states == {"completed": 300}
    assert len(ids) == 300
    died = conn.execute("SELECT count(*) FROM pulse_job_attempts WHERE outcome = 'worker_died'"
                        ).fetchone()[0]
    assert died >= 1
    assert daemon.proc.poll() is None


def test_ttin_ttou_and_hup_replace_workers(daemon_factory, conn, marks):
    daemon = daemon_factory(workers=2).start()
    daemon.wait_ready()
    daemon.signal(signal.SIGTTIN)
    daemon.wait_ready(workers=3)
    # One signal at a time: two pending TTOUs would merge into one.
    daemon.signal(signal.SIGTTOU)
    daemon.wait_ready(workers=2)
    daemon.signal(signal.SIGTTOU)
    daemon.wait_ready(workers=1)

    old = set(daemon.workers())
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: set(daemon.workers()) and not (set(daemon.workers()) & old)
               and len(daemon.workers()) == 1, timeout=20,
               message=f"HUP did not replace the workers; log:\n{daemon.log_tail()}")
    job_id = pulsed.enqueue(conn, "noop", {"dir": str(marks)})
    wait_until(lambda: conn.execute("SELECT state::text FROM pulse_jobs WHERE id = %s",
                                    (job_id,)).fetchone()[0] == "completed", timeout=10)


def test_max_jobs_recycles_workers(daemon_factory, conn, marks):
    daemon = daemon_factory(workers=1, config={"worker": {"max_jobs": 5}}).start()
    daemon.wait_ready()
    pulsed.enqueue_many(conn, [{"type": "noop", "payload": {"dir": str(marks)}}] * 30)
    wait_until(lambda: _states(conn).get("completed", 0) == 30, timeout=30)
    pids = {name.split(".")[2] for name in os.listdir(marks)}
    assert len(pids) >= 4, f"30 jobs at max_jobs=5 (+10% jitter) ran in only {pids}"
    assert "worker_died" not in {r[0] for r in conn.execute(
        "SELECT outcome FROM pulse_job_attempts")}


def test_process_titles_name_role_and_state(daemon_factory, conn, marks):
    daemon = daemon_factory(workers=1).start()
    daemon.wait_ready()
    titles = set(daemon.children().values())
    assert any(t.startswith("pulsed: scheduler [") for t in titles), titles
    assert "pulsed: worker 1 [idle]" in titles
    job_id = pulsed.enqueue(conn, "sleep", {"s": 3, "dir": str(marks)})
    wait_until(lambda: f"pulsed: worker 1 [busy sleep#{job_id}]" in daemon.children().values(),
               timeout=5)
    master = Path(f"/proc/{daemon.pid}/cmdline").read_bytes().decode()
    assert master.startswith("pulsed: master")


def test_systemd_notify_ready_watchdog_stopping(daemon_factory, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    daemon = daemon_factory(workers=1, env={"NOTIFY_SOCKET": path,
                                            "WATCHDOG_USEC": "1000000"}).start()
    seen: list[str] = []

    def received(text: str) -> bool:
        try:
            seen.extend(sock.recv(4096).decode().splitlines())
        except TimeoutError:
            pass
        return any(line.startswith(text) for line in seen)

    wait_until(lambda: received("READY=1"), timeout=20, message=f"READY=1 (got {seen})")
    assert any(line.startswith("STATUS=") for line in seen)
    wait_until(lambda: received("WATCHDOG=1"), timeout=5, message=f"WATCHDOG=1 (got {seen})")
    daemon.signal(signal.SIGTERM)
    wait_until(lambda: received("STOPPING=1"), timeout=10, message=f"STOPPING=1 (got {seen})")
    assert daemon.wait_exit(timeout=10) == 0
    sock.close()
