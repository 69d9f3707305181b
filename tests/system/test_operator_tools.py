"""What operators of gunicorn, Sidekiq and Celery reach for: `pulsectl logs`
(the children's recent lines from the master's ring, and --follow),
`pulsectl restart worker N`, and on /metrics pulse_build_info, process_*
for every child, the child-restarts counter and the queue label."""

from __future__ import annotations

import json
import os
import signal
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
from tests.system.daemon import Daemon, free_port
from tests.system.test_observability import ApiDaemon, samples, total

pytestmark = pytest.mark.timeout(120)


def pulsectl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pulsectl", "--config", str(daemon.config_path), *args],
        capture_output=True, text=True, timeout=60)


def _worker_index(daemon: Daemon, pid: int) -> int:
    return next(c["index"] for c in daemon.status()["children"] if c["pid"] == pid)


def _state(conn: psycopg.Connection, job_id: int) -> JobState:
    return Store(conn).get_job(job_id, with_attempts=False).state


def test_pulsectl_logs_tails_the_childrens_lines_and_follows_new_ones(
        daemon_factory: Any, conn: psycopg.Connection) -> None:
    daemon = daemon_factory().start()
    daemon.wait_ready()
    first = pulsed.enqueue(conn, "say_log", {"text": "first words"})
    wait_until(lambda: _state(conn, first) is JobState.COMPLETED, timeout=30,
               message="the say job never completed")

    def shown(*args: str) -> str:
        result = pulsectl(daemon, "logs", *args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    wait_until(lambda: "say: first words" in shown("worker"), timeout=10,
               message=f"pulsectl logs never showed the line: {shown()}")
    [line] = [l for l in shown("worker").splitlines() if "say: first words" in l]
    assert line.startswith("worker ")
    index = int(line.split()[1])
    assert "say: first words" in shown("worker", str(index))
    assert "say: first words" not in shown("scheduler")
    assert len(shown("-n", "1").splitlines()) == 1
    assert [json.loads(l)["role"] for l in shown("--json", "worker").splitlines()] != []
    assert "say: first words" in daemon.log_text()  # still passed on to the master's stderr

    out = daemon.root / "follow.out"
    with open(out, "w") as sink:
        # SIGINT's default action, as a shell gives a command it runs: a pytest
        # started as a background job (CI) ignores SIGINT, and a child would
        # inherit that and never see the Ctrl-C this test sends.
        follower = subprocess.Popen(
            [sys.executable, "-m", "pulsectl", "--config", str(daemon.config_path), "logs",
             "worker", "-n", "1", "--follow"], stdout=sink, stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # its first line printed, it follows: what comes now is new
        wait_until(lambda: out.read_text().count("\n") == 1, timeout=20,
                   message="logs --follow never printed the last line")
        later = pulsed.enqueue(conn, "say_log", {"text": "later words"})
        wait_until(lambda: "say: later words" in out.read_text(), timeout=20,
                   message="--follow never printed the new line")
        assert "say: first words" not in out.read_text()
        assert _state(conn, later) is JobState.COMPLETED
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=10)


def test_restart_worker_replaces_it_after_its_job_and_is_no_crash(
        daemon_factory: Any, conn: psycopg.Connection, marks: Any) -> None:
    port = free_port()
    daemon = daemon_factory(config={"api": {"enabled": True, "listen": f"127.0.0.1:{port}"}})
    daemon.start().wait_ready()
    node = ApiDaemon(daemon, port)
    node.wait_healthy()
    job_id = pulsed.enqueue(conn, "sleep", {"s": 2.0, "dir": str(marks)})
    wait_until(lambda: list(marks.glob("*.start")), timeout=20, message="the job never started")
    [mark] = marks.glob("*.start")
    old_pid = int(mark.name.split(".")[2])
    index = _worker_index(daemon, old_pid)

    result = pulsectl(daemon, "--json", "restart", "worker", str(index))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"role": "worker", "index": index, "pid": old_pid}
    wait_until(lambda: any(c["role"] == "worker" and c["index"] == index and c["pid"] != old_pid
                           for c in daemon.status()["children"]), timeout=20,
               message=f"no new worker {index}: {daemon.status()['children']}")
    wait_until(lambda: _state(conn, job_id) is JobState.COMPLETED, timeout=20,
               message="the restarted worker's job did not finish")
    assert Store(conn).get_job(job_id).attempts[-1].outcome == "completed"
    wait_until(lambda: all(c["pid"] != old_pid for c in daemon.status()["children"]),
               timeout=20, message="the old worker never left the master's table")
    workers = [c for c in daemon.status()["children"] if c["role"] == "worker"]
    assert [c["restarts"] for c in workers] == [0, 0], workers
    assert total(node.metrics(), "pulse_child_restarts_total") == 0

    refused = pulsectl(daemon, "restart", "worker", "9")
    assert refused.returncode == 1 and "no running worker 9" in refused.stderr


def test_metrics_show_the_build_every_childs_process_crashes_and_queues(
        daemon_factory: Any, conn: psycopg.Connection) -> None:
    port = free_port()
    daemon = daemon_factory(config={"api": {"enabled": True, "listen": f"127.0.0.1:{port}"}})
    daemon.start().wait_ready()
    node = ApiDaemon(daemon, port)
    node.wait_healthy()
    pulsed.enqueue(conn, "noop", queue="mail")
    pulsed.enqueue(conn, "noop")
    wait_until(lambda: total(node.metrics(), "pulse_jobs_total", outcome="completed") == 2,
               timeout=30, message="the two jobs were never counted")
    found = node.metrics()
    jobs = {k: v for k, v in found.items() if k[0] == "pulse_jobs_total"}
    assert total(found, "pulse_jobs_total", type="noop", queue="mail") == 1, jobs
    assert total(found, "pulse_jobs_total", type="noop", queue="default") == 1, jobs
    assert total(found, "pulse_build_info", version=pulsed.__version__) == 1
    processes = {k: v for k, v in found.items() if k[0] == "process_resident_memory_bytes"}
    for role, index in (("master", "0"), ("scheduler", "0"), ("worker", "1"), ("worker", "2"),
                        ("api", "0")):
        assert total(found, "process_resident_memory_bytes", role=role, index=index) > 0, \
            processes
        assert total(found, "process_start_time_seconds", role=role, index=index) > 1e9

    victim = next(iter(daemon.workers()))
    os.kill(victim, signal.SIGKILL)  # a crash, twice: a crash loop shows as a rising count
    wait_until(lambda: victim not in daemon.workers() and len(daemon.workers()) == 2, timeout=30,
               message=f"the killed worker was not replaced; log:\n{daemon.log_tail()}")
    second = next(iter(daemon.workers()))
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: total(node.metrics(), "pulse_child_restarts_total", role="worker",
                             reason="killed") == 2, timeout=30,
               message=f"pulse_child_restarts never counted the two kills; log:\n"
                       f"{daemon.log_tail()}")
    promtool_check(node.get("/metrics")[2].decode())
