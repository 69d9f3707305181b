"""Boot failures, chaos, signals, recycling and the systemd notify protocol."""

from __future__ import annotations

import os
import random
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest

import pulsed
from pulsed.control.client import ControlClient
from tests.pg import wait_until
from tests.system.daemon import free_port

pytestmark = pytest.mark.timeout(120)


def _states(conn: psycopg.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT state::text, count(*) FROM pulse_jobs GROUP BY 1").fetchall())


def test_broken_handler_module_backs_off_and_reports_the_error(daemon_factory):
    """The backoff's arithmetic is tests/unit/test_master_table.py's; this
    checks the real master applies it: workers that cannot boot wait out a
    growing backoff, shown with their error, while the rest runs on."""
    daemon = daemon_factory(workers=2, config={
        "worker": {"handlers": ["tests.system.broken_jobs"]}}).start()

    wait_until(lambda: daemon.socket_path.exists(), timeout=10)

    def backing_off() -> list[dict]:
        status = daemon.status()
        workers = [c for c in status["children"] if c["role"] == "worker"]
        return workers if all(c["state"] == "backoff" and c["restarts"] >= 2
                              for c in workers) else []

    workers = wait_until(backing_off, timeout=20, message="workers never backed off")
    assert len(workers) == 2
    for child in workers:
        assert "broken on purpose" in (child["error"] or ""), child
        assert child["respawn_in_s"] > 0
    status = daemon.status()
    assert status["master"]["state"] == "running" and daemon.proc.poll() is None
    assert status["master"]["degraded"] is True
    scheduler = [c for c in status["children"] if c["role"] == "scheduler"]
    assert scheduler and scheduler[0]["restarts"] == 0


def test_a_reload_to_handlers_that_cannot_import_keeps_the_old_workers(daemon_factory, conn,
                                                                      marks):
    """The new workers fail at boot; the old ones keep taking jobs (they
    were stopped within a second, and none were left), and the master goes
    back to the config before the reload. A reload of a good config hands
    over to a generation that is up."""
    daemon = daemon_factory(workers=2).start()
    daemon.wait_ready()
    old = set(daemon.workers())
    good = daemon.config_path.read_text()
    daemon.write_config(node_id="node-a", workers=2,
                        extra={"worker": {"handlers": ["tests.system.broken_jobs"]}})
    assert ControlClient(daemon.socket_path).request("reload")["reloaded"]

    wait_until(lambda: "going back to the config before the reload" in daemon.log_text(),
               timeout=20, message="the reload was not rolled back")
    # the rolled-back generation comes up and takes over from the old workers
    wait_until(lambda: len(daemon.workers()) == 2 and not set(daemon.workers()) & old,
               timeout=30, message=lambda: f"no hand-over after the roll-back; "
                                           f"log:\n{daemon.log_tail()}")
    assert daemon.log_text().count("could not start (boot error)") <= 2 + 2  # no crash loop
    old = set(daemon.workers())
    job_id = pulsed.enqueue(conn, "noop", {"dir": str(marks)})
    wait_until(lambda: list(marks.glob(f"{job_id}.*.done")), timeout=15,
               message=f"no worker ran a job after the bad reload; log:\n{daemon.log_tail()}")

    daemon.config_path.write_text(good)
    assert ControlClient(daemon.socket_path).request("reload")["reloaded"]
    wait_until(lambda: len(daemon.workers()) == 2 and not set(daemon.workers()) & old,
               timeout=30, message=f"the good reload did not hand over; log:\n{daemon.log_tail()}")
    job_id = pulsed.enqueue(conn, "noop", {"dir": str(marks)})
    wait_until(lambda: list(marks.glob(f"{job_id}.*.done")), timeout=15)


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


def _healthz(port: int) -> int:
    """The status of GET /healthz; 0 when nothing answered."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _role_pids(daemon, role: str) -> set[int]:
    return {c["pid"] for c in daemon.status()["children"] if c["role"] == role and c["pid"]}


def test_a_reload_under_a_long_job_keeps_scheduler_leader_and_api(daemon_factory, conn, marks):
    """Old and new generations overlap while the old worker finishes its job:
    no scheduler restart, one leader hand-over at most, the API answers all
    along (the listening socket outlives its children), nothing logged as an
    error."""
    port = free_port()
    daemon = daemon_factory(workers=2, config={
        "api": {"enabled": True, "listen": f"127.0.0.1:{port}"}}).start()
    daemon.wait_ready()
    wait_until(lambda: _healthz(port) == 200, timeout=20,
               message=f"/healthz never said 200; log:\n{daemon.log_tail()}")
    term = wait_until(lambda: daemon.status()["leader"]["is_me"]
                      and daemon.status()["leader"]["term"], timeout=20)
    job_id = pulsed.enqueue(conn, "sleep", {"s": 8, "dir": str(marks)})
    wait_until(lambda: list(marks.glob(f"{job_id}.1.*.start")), timeout=10)
    old = {role: _role_pids(daemon, role) for role in ("scheduler", "api", "worker")}

    assert ControlClient(daemon.socket_path).request("reload")["reloaded"]
    unanswered = 0

    def replaced() -> bool:
        nonlocal unanswered
        unanswered += _healthz(port) == 0
        return all(_role_pids(daemon, role) and not _role_pids(daemon, role) & old[role]
                   for role in ("scheduler", "api"))

    wait_until(replaced, timeout=30, interval=0.05,
               message=f"the reload never replaced scheduler and api; log:\n{daemon.log_tail()}")
    assert len(_role_pids(daemon, "worker") - old["worker"]) == 2  # the new generation
    assert _role_pids(daemon, "worker") & old["worker"], \
        f"the busy old worker left early; log:\n{daemon.log_tail()}"
    wait_until(lambda: job_state(conn, job_id) == "completed", timeout=20,
               message=f"the long job did not finish; log:\n{daemon.log_tail()}")
    wait_until(lambda: len(_role_pids(daemon, "worker")) == 2, timeout=20)
    wait_until(lambda: _healthz(port) == 200 and daemon.status()["leader"]["is_me"],
               timeout=20, message=f"no healthy leader after the reload: {daemon.status()}")

    status = daemon.status()
    assert unanswered == 0, f"the API refused {unanswered} requests during the hand-over"
    assert [c["restarts"] for c in status["children"]] == [0] * len(status["children"])
    assert status["leader"]["term"] in (term, term + 1), (term, status["leader"])
    assert conn.execute("SELECT attempt FROM pulse_jobs WHERE id = %s",
                        (job_id,)).fetchone()[0] == 1
    children = sorted((c["role"], c["pid"]) for c in status["children"])
    wait_until(lambda: _registered(conn) == children, timeout=15,
               message=f"the registry does not list the live children {children}: "
                       f"{_registered(conn)}")
    log = daemon.log_text()
    for bad in (" ERROR ", "Traceback", "CardinalityViolation", "Address already in use"):
        assert bad not in log, f"{bad!r} in the log:\n{daemon.log_tail(80)}"


def _registered(conn: psycopg.Connection) -> list[tuple[str, int]]:
    return sorted(conn.execute("SELECT role, pid FROM pulse_processes"
                               " WHERE node_id = 'node-a' AND role <> 'master'").fetchall())


def job_state(conn: psycopg.Connection, job_id: int) -> str:
    return conn.execute("SELECT state::text FROM pulse_jobs WHERE id = %s", (job_id,)).fetchone()[0]


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
