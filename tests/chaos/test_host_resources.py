"""The host's bad day: resources a real `pulsed` needs run out.

- fork fails (EAGAIN: the process limit reached, see ForkLimit) while the master restarts a
  crashed worker, scales up or reloads: the master keeps running, keeps
  what runs, retries with its crash backoff and says why in status and log;
  once processes are available again the missing children come back.
- the state directory (status snapshot, metric files) on a small tmpfs
  that fills up: jobs still run, no process dies or crash-loops, status
  answers (the snapshot ages; the log says why).
- file descriptors: the master at RLIMIT_NOFILE 64 with more idle control
  clients than it has descriptors: `pulsectl status` is still answered.
- memory: a handler allocating until MemoryError (the worker's RLIMIT_AS
  capped), in each execution mode: that attempt fails with the error and
  is retried, the other jobs complete.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pulsed

from pulsed.control.client import ControlClient
from tests.pg import wait_until
from tests.system.daemon import Daemon, pid_alive

pytestmark = pytest.mark.timeout(60)

PIDS_CGROUPS = Path("/sys/fs/cgroup/pids")  # cgroup v1's pids controller


class ForkLimit:
    """A pids cgroup of the test's own holding the master alone (its
    children, forked before, stay where they were). `deny()` sets pids.max
    to 1: every fork the master tries fails with EAGAIN, what a service
    user at its RLIMIT_NPROC or a unit at its TasksMax= gets. (RLIMIT_NPROC
    itself does not bind root, and the daemon's Python is root's.)"""

    def __init__(self, path: Path) -> None:
        self.path = path

    def hold(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def deny(self) -> None:
        (self.path / "pids.max").write_text("1")

    def allow(self) -> None:
        (self.path / "pids.max").write_text("max")

    def failures(self) -> int:
        """Forks refused so far (pids.events: max N)."""
        return int((self.path / "pids.events").read_text().split()[1])


@pytest.fixture
def fork_limit() -> Iterator[ForkLimit]:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a pids cgroup")
    if not (PIDS_CGROUPS / "cgroup.procs").exists():
        pytest.skip(f"no cgroup v1 pids controller at {PIDS_CGROUPS}")
    path = Path(tempfile.mkdtemp(prefix="pulse-test-", dir=PIDS_CGROUPS))
    yield ForkLimit(path)
    # Tests ask for this fixture before daemon_factory, whose teardown (the
    # daemons killed) runs first; anything left goes back to the root group.
    for pid in (path / "cgroup.procs").read_text().split():
        try:
            (PIDS_CGROUPS / "cgroup.procs").write_text(pid)
        except OSError:
            pass
    path.rmdir()


def _rows(daemon: Daemon, role: str = "worker") -> list[dict[str, Any]]:
    return [c for c in daemon.status()["children"] if c["role"] == role]


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_fork_failing_keeps_the_master_and_its_children(fork_limit, daemon_factory):
    daemon = daemon_factory(workers=2).start()
    daemon.wait_ready()
    workers = sorted(daemon.workers())
    scheduler = daemon.scheduler()
    fork_limit.hold(daemon.pid)
    fork_limit.deny()

    # A crashed worker's restart cannot fork.
    os.kill(workers[0], signal.SIGKILL)
    wait_until(lambda: "cannot fork" in daemon.log_text() or not pid_alive(daemon.pid),
               timeout=10,
               message=lambda: f"no fork failure logged; log:\n{daemon.log_tail()}")
    assert pid_alive(daemon.pid), f"the master died; log:\n{daemon.log_tail()}"
    # A scale-up cannot fork either.
    assert ControlClient(daemon.socket_path, timeout=5).request("scale", workers="3")["workers"] == 3
    wait_until(lambda: len([r for r in _rows(daemon) if r["state"] == "backoff"]) == 2,
               timeout=10, message=lambda: f"status: {_rows(daemon)}\n{daemon.log_tail()}")
    rows = _rows(daemon)
    waiting = [r for r in rows if r["state"] == "backoff"]
    assert all("fork" in (r["error"] or "") for r in waiting), rows
    # What ran keeps running, and the master does not spin on the failures.
    assert workers[1] in daemon.workers() and daemon.scheduler() == scheduler
    ticks = _cpu_ticks(daemon.pid)
    wait_until(lambda: daemon.log_text().count("cannot fork") >= 4, timeout=10,
               message=lambda: f"no retries; log:\n{daemon.log_tail()}")
    spent = (_cpu_ticks(daemon.pid) - ticks) / os.sysconf("SC_CLK_TCK")
    assert spent < 1.0, f"the master spent {spent:.2f}s of CPU retrying"

    # Processes again: the missing workers come back within the backoff.
    fork_limit.allow()
    wait_until(lambda: len([r for r in _rows(daemon) if r["state"] == "idle"]) == 3,
               timeout=20, message=lambda: f"status: {_rows(daemon)}\n{daemon.log_tail()}")
    assert daemon.status()["master"]["degraded"] is False


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of the test's own, unmounted at teardown (after the
    daemons: ask for it before daemon_factory)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to mount a tmpfs")
    path = tmp_path / "small"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    yield path
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> Path:
    """Write zeros into folder until its filesystem is full."""
    filler = folder / "filler"
    chunk = b"\0" * 4096
    try:
        with open(filler, "wb", buffering=0) as out:
            while True:
                out.write(chunk)
    except OSError:
        pass
    return filler


def _done(conn: psycopg.Connection, ids: list[int]) -> int:
    return conn.execute("SELECT count(*) FROM pulse_jobs WHERE id = ANY(%s) "
                        "AND state = 'completed'", (ids,)).fetchone()[0]


def test_a_full_state_dir_stops_no_job_and_no_child(small_tmpfs, daemon_factory, conn, marks):
    state = small_tmpfs / "state"
    daemon = daemon_factory(workers=2, config={"daemon": {"state_dir": str(state)}}).start()
    daemon.wait_ready()
    first = [pulsed.enqueue(conn, "noop", {}) for _ in range(20)]
    wait_until(lambda: _done(conn, first) == 20, timeout=10, message="first jobs not done")
    wait_until(lambda: daemon.status()["snapshot_age_s"] is not None, timeout=10,
               message="no snapshot written")
    children = set(daemon.children())

    _fill(small_tmpfs)
    # Through a few snapshot periods and metric writes of new series.
    ids = [pulsed.enqueue(conn, ("noop", "timed", "sleep", "limited", "rated")[i % 5],
                          {"s": 0, "dir": str(marks)}) for i in range(50)]
    wait_until(lambda: _done(conn, ids) == 50 or daemon.proc.poll() is not None, timeout=15,
               message=lambda: f"jobs not done on a full state dir; log:\n{daemon.log_tail()}")
    # Before: the metric files' pages had no blocks behind them (sparse),
    # and the first store into one was a SIGBUS, the master's included.
    assert daemon.proc.poll() is None, f"pulsed exited with {daemon.proc.poll()}"
    snapshot_age = lambda: daemon.status()["snapshot_age_s"] or 0  # noqa: E731
    wait_until(lambda: snapshot_age() > 3, timeout=10, message="the snapshot kept its age")
    assert set(daemon.children()) == children, f"children restarted; log:\n{daemon.log_tail()}"
    assert "No space left on device" in daemon.log_text()


def test_idle_control_clients_past_the_fd_limit_do_not_lock_pulsectl_out(daemon_factory):
    daemon = daemon_factory(workers=1).start()
    daemon.wait_ready()
    resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (64, 64))
    idle: list[socket.socket] = []
    try:
        for _ in range(80):  # connected, never a request: more than the master has fds
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(daemon.socket_path))
            idle.append(sock)
        wait_until(lambda: "cannot accept" in daemon.log_text(), timeout=10,
                   message=lambda: f"the master never ran out of fds; log:\n{daemon.log_tail()}")
        started = time.monotonic()
        reply = ControlClient(daemon.socket_path, timeout=8).request("status")
        assert reply["master"]["pid"] == daemon.pid
        assert time.monotonic() - started < 8
    finally:
        for sock in idle:
            sock.close()


def _vsize(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[20])


@pytest.mark.parametrize("mode", ["one", "threads", "asyncio"])
def test_a_handler_out_of_memory_fails_its_attempt_only(mode, daemon_factory, conn, marks):
    concurrency, handler = {"one": (1, "hog"), "threads": (4, "hog"),
                            "asyncio": (4, "async_hog")}[mode]
    daemon = daemon_factory(workers=1, config={"worker": {"concurrency": concurrency}}).start()
    daemon.wait_ready()
    worker = next(iter(daemon.workers()))
    # Warm up: the job threads started (each with its malloc arena) before
    # the cap, as in a worker that has run for a while.
    warm = [pulsed.enqueue(conn, "sleep", {"s": 0.2}) for _ in range(2 * concurrency)]
    wait_until(lambda: _done(conn, warm) == len(warm), timeout=10, message="warm-up not done")
    # Room for the worker as it is and 200 MiB more.
    limit = _vsize(worker) + 200 * 2**20
    resource.prlimit(worker, resource.RLIMIT_AS, (limit, limit))
    hog = pulsed.enqueue(conn, handler, {"dir": str(marks)})
    others = [pulsed.enqueue(conn, "noop", {"dir": str(marks)}) for _ in range(20)]
    wait_until(lambda: _done(conn, [hog, *others]) == 21, timeout=20,
               message=lambda: f"jobs not done; log:\n{daemon.log_tail()}")
    rows = conn.execute("SELECT attempt, outcome, error_class FROM pulse_job_attempts "
                        "WHERE job_id = %s ORDER BY attempt", (hog,)).fetchall()
    # A completion writes no attempt row: the first attempt's error, then done on the second.
    assert rows == [(1, "error", "MemoryError")], (rows, daemon.log_tail())
    assert conn.execute("SELECT attempt FROM pulse_jobs WHERE id = %s", (hog,)).fetchone()[0] == 2
    assert worker in daemon.workers(), f"the worker did not survive; log:\n{daemon.log_tail()}"


def test_job_threads_the_host_no_longer_allows_cost_no_job(daemon_factory, conn, marks):
    """A worker at concurrency 4 whose address space is then capped to what
    it maps already (a handler's growth, RLIMIT_AS, a thread-counting
    limit): its job threads started with it, so 8 jobs still run, once
    each. The pool once started them on the first jobs: the first start it
    could not make raised out of the loop, the worker died and the jobs it
    held were recorded worker_died."""
    daemon = daemon_factory(workers=1, config={"worker": {"concurrency": 4}}).start()
    daemon.wait_ready()
    worker = next(iter(daemon.workers()))
    wait_until(lambda: "[starting]" not in daemon.workers().get(worker, "[starting]"),
               timeout=10, message="the worker never finished starting")
    limit = _vsize(worker) + 2**20  # no room for another thread's 8 MiB stack
    resource.prlimit(worker, resource.RLIMIT_AS, (limit, limit))
    ids = [pulsed.enqueue(conn, "sleep", {"s": 0.2, "dir": str(marks)}) for _ in range(8)]
    wait_until(lambda: _done(conn, ids) == len(ids), timeout=20,
               message=lambda: f"jobs not done; log:\n{daemon.log_tail()}")
    attempts = conn.execute("SELECT count(*) FROM pulse_job_attempts WHERE job_id = ANY(%s)",
                            (ids,)).fetchone()[0]
    assert attempts == 0, daemon.log_tail()  # none died with a worker
    assert worker in daemon.workers(), f"the worker did not survive; log:\n{daemon.log_tail()}"
