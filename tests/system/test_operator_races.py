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
