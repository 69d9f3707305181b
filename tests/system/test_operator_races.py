"""The operator's bad day, on real daemons: control commands and signals
that arrive together, repeated, or in the middle of a transition."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import pulsed
from tests.pg import wait_until
from tests.system.daemon import REPO

pytestmark = pytest.mark.timeout(60)

LONG_STOP_TIMEOUT = 60  # seconds: far longer than any wait below


def pulsectl(daemon, *args: str) -> subprocess.Popen[str]:
    """A real pulsectl process, started now; .communicate() for its outcome."""
    return subprocess.Popen(
        [sys.executable, "-m", "pulsectl", "--socket", str(daemon.socket_path), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"})


def run(daemon, *args: str, timeout: float = 30) -> tuple[int, str, str]:
    proc = pulsectl(daemon, *args)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def started(marks, job_id: int) -> bool:
    return any(name.startswith(f"{job_id}.") and name.endswith(".start")
               for name in os.listdir(marks))


def test_stop_now_during_a_graceful_stop_stops_at_once(daemon_factory, conn, marks):
    """`pulsectl stop --now` is "like SIGQUIT", and a SIGQUIT (or a second
    Ctrl-C) turns a graceful stop that waits on a long job into a fast one.
    It was refused (shutting_down) once a stop had begun: the operator whose
    stop hung on a job could not escalate with pulsectl."""
    daemon = daemon_factory(workers=1, config={
        "daemon": {"stop_timeout": LONG_STOP_TIMEOUT}}).start()
    daemon.wait_ready()
    job_id = pulsed.enqueue(conn, "sleep", {"s": LONG_STOP_TIMEOUT * 2, "dir": str(marks)})
    wait_until(lambda: started(marks, job_id), timeout=30, message="the job never started")
    code, out, err = run(daemon, "stop")
    assert code == 0, err
    code, out, err = run(daemon, "stop", "--now")
    assert code == 0, f"stop --now during a stop: {code} {out!r} {err!r}"
    assert "stopping now" in out
    assert daemon.wait_exit(timeout=20) == 0  # not after the 60 s stop timeout
    assert "fast stop" in daemon.log_text()


def test_commands_queued_at_a_frozen_master_are_not_carried_out_after_their_clients_gave_up(
        daemon_factory, conn, marks):
    """SIGSTOP the master, ask it to scale +1 three times and to drain: each
    pulsectl gives up (exit 3, "no reply") and the operator reads that
    nothing happened. After SIGCONT the master found the four requests
    waiting on the socket and carried them all out in one burst (4 workers,
    draining) for clients long gone; it now drops a write command whose
    client hung up before it was read, and says so."""
    daemon = daemon_factory(workers=1).start()
    daemon.wait_ready()
    daemon.signal(signal.SIGSTOP)
    try:
        asked = [pulsectl(daemon, "scale", "workers=+1") for _ in range(3)]
        asked.append(pulsectl(daemon, "drain"))
        for proc in asked:
            out, err = proc.communicate(timeout=40)
            assert proc.returncode == 3, (out, err)
            assert "no reply within" in err
            assert "did not answer" in err  # not "Is pulsed running? Start it"
    finally:
        daemon.signal(signal.SIGCONT)
    wait_until(lambda: daemon.log_text().count("not carried out") == 4, timeout=10,
               message=lambda: f"the stale requests were not dropped; log:\n{daemon.log_tail()}")
    master = daemon.status()["master"]
    assert (master["workers_desired"], master["state"]) == (1, "running"), master
    code, out, err = run(daemon, "scale", "workers=+1")  # a live client is served
    assert code == 0 and "workers: 2" in out, (out, err)
    daemon.wait_ready(workers=2)


def test_a_reload_that_changes_the_node_id_keeps_the_running_one(daemon_factory, conn, marks):
    """The node id is the master's (its node claim, the lease owners it
    releases when a worker dies): a reload handed the new one to the new
    children only. Their scheduler then said the node was "held by another
    pulsed start", and a worker killed after the reload left its job leased
    until its lease expired, as the master released leases under the old
    name. Like database.url, it now takes effect on restart."""
    daemon = daemon_factory(workers=1, config={"worker": {"lease_ttl": LONG_STOP_TIMEOUT}}).start()
    daemon.wait_ready()
    old = set(daemon.workers())
    daemon.write_config(node_id="node-renamed", workers=1,
                        extra={"worker": {"lease_ttl": LONG_STOP_TIMEOUT}})
    code, out, err = run(daemon, "reload")
    assert code == 0, err
    wait_until(lambda: daemon.workers() and not set(daemon.workers()) & old, timeout=20,
               message=lambda: f"the reload did not hand over; log:\n{daemon.log_tail()}")
    job_id = pulsed.enqueue(conn, "sleep", {"s": LONG_STOP_TIMEOUT * 2, "dir": str(marks)})
    wait_until(lambda: started(marks, job_id), timeout=20, message="the job never started")
    owner = conn.execute("SELECT lease_owner FROM pulse_jobs WHERE id = %s",
                         (job_id,)).fetchone()[0]
    assert owner.startswith("node-a/"), owner
    os.kill(next(iter(daemon.workers())), signal.SIGKILL)
    # released by the master at once, not at lease expiry (60 s)
    wait_until(lambda: conn.execute("SELECT state::text FROM pulse_jobs WHERE id = %s",
                                    (job_id,)).fetchone()[0] != "running", timeout=10,
               message=lambda: f"the dead worker's job stayed leased; log:\n{daemon.log_tail()}")
    log = daemon.log_text()
    assert "daemon.node_id changed" in log
    assert "held by another pulsed" not in log
    assert daemon.status()["master"]["node_id"] == "node-a"


def test_a_worker_killed_by_someone_else_during_a_scale_down_died(daemon_factory, conn, marks):
    """kill -9 (the operator, the OOM killer) of a worker that a scale-down
    was letting finish its job: the master did not kill it, yet its job's
    attempt read "interrupted: the worker was stopped past its stop timeout"
    (given back, not counted: a job that blows the memory never became
    poison). It is a worker death like any other now."""
    daemon = daemon_factory(workers=2, config={
        "daemon": {"stop_timeout": LONG_STOP_TIMEOUT}}).start()
    daemon.wait_ready()
    ids = [pulsed.enqueue(conn, "sleep_first", {"s": LONG_STOP_TIMEOUT * 2, "dir": str(marks)})
           for _ in range(2)]
    wait_until(lambda: all(started(marks, job_id) for job_id in ids), timeout=20,
               message="the jobs never started")
    code, out, err = run(daemon, "scale", "workers=1")
    assert code == 0, err
    leaving = wait_until(lambda: [c for c in daemon.status()["children"]
                                  if c["role"] == "worker" and c["state"] == "stopping"],
                         timeout=10, message="no worker was leaving")
    os.kill(leaving[0]["pid"], signal.SIGKILL)
    attempt = wait_until(lambda: conn.execute(
        "SELECT job_id, outcome::text, error_message FROM pulse_job_attempts"
        " WHERE outcome IS NOT NULL").fetchone(), timeout=10,
        message=lambda: f"no attempt ended; log:\n{daemon.log_tail()}")
    job_id, outcome, message = attempt
    assert outcome == "worker_died", attempt
    assert "stop timeout" not in message
    state, owner = conn.execute("SELECT state::text, lease_owner FROM pulse_jobs WHERE id = %s",
                                (job_id,)).fetchone()
    assert state != "running" or not owner.endswith(f"/{leaving[0]['pid']}"), (state, owner)
