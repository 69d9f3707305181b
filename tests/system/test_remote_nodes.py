"""Two real daemons (node-a with the API, node-b without), one database:
node-a's console drains and resumes node-b (pulsed/node_commands.py: a row
and a NOTIFY that node-b's scheduler carries out through its master), and
shows node-b's workers' RSS and restarts from the registry (issue 19)."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import psycopg
import pytest

import pulsed
from tests.pg import wait_until
from tests.system.daemon import Daemon, free_port

pytestmark = pytest.mark.timeout(150)
TOKEN = "remote-test-secret"
WAIT_S = 30.0


def call(daemon: Daemon, path: str, *, post: bool = False) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        daemon.url + path, method="POST" if post else "GET", data=b"" if post else None,
        headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=15) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def node_view(daemon: Daemon, node_id: str) -> dict[str, Any] | None:
    _, cluster = call(daemon, "/console/cluster.json")
    return next((n for n in cluster["nodes"] if n["node_id"] == node_id), None)


@pytest.fixture
def pair(daemon_factory: Callable[..., Daemon]) -> tuple[Daemon, Daemon]:
    port = free_port()
    a = daemon_factory("a", workers=1, config={"api": {
        "enabled": True, "listen": f"127.0.0.1:{port}", "tokens": [f"ops:{TOKEN}"]}})
    a.url = f"http://127.0.0.1:{port}"
    b = daemon_factory("b", workers=2)
    a.start(), b.start()
    a.wait_ready(), b.wait_ready()
    wait_until(lambda: (node_view(a, "node-b") or {}).get("state") == "running",
               timeout=WAIT_S, message=f"node-a never saw node-b; log:\n{a.log_tail()}")
    return a, b


def ran_on(marks: Path, ids: list[int]) -> set[int]:
    """The pids of the workers that ran these jobs (the handler's marks)."""
    names = [p.name.split(".") for p in marks.iterdir() if p.name.endswith(".done")]
    return {int(pid) for job, _, pid, _ in names if int(job) in ids}


def run_jobs(conn: psycopg.Connection, marks: Path, count: int) -> set[int]:
    ids = [pulsed.enqueue(conn, "noop", {"dir": str(marks)}) for _ in range(count)]
    wait_until(lambda: len({n.split(".")[0] for n in os.listdir(marks)} & set(map(str, ids)))
               == count, timeout=WAIT_S, message="the jobs never all ran")
    return ran_on(marks, ids)


def test_node_a_drains_and_resumes_node_b(pair, dsn, marks):
    a, b = pair
    with psycopg.connect(dsn, autocommit=True) as conn:
        status, reply = call(a, "/nodes/node-b/drain", post=True)
        assert status == 200, reply
        assert reply["by"] == "ops" and reply["state"] in ("draining", "drained"), reply
        assert b.status()["master"]["state"] in ("draining", "drained")
        wait_until(lambda: node_view(a, "node-b")["state"] == "drained", timeout=WAIT_S,
                   message="node-a's cluster view never showed node-b drained")
        # node-b claims nothing: every job runs on node-a's worker.
        assert run_jobs(conn, marks, 20) <= set(a.workers())

        status, reply = call(a, "/nodes/node-b/resume", post=True)
        assert (status, reply["state"]) == (200, "running"), reply
        assert b.status()["master"]["state"] == "running"
        # node-a drained (its own console: the local path), node-b runs them all.
        assert call(a, "/nodes/node-a/drain", post=True)[0] == 200
        assert run_jobs(conn, marks, 20) <= set(b.workers())
    # Who asked is in both nodes' logs; each request was carried out once.
    assert "drain asked by ops" in a.log_text()
    assert b.log_text().count("drain asked by ops on node node-a") == 1, b.log_tail()
    assert b.log_text().count("resume asked by ops on node node-a") == 1, b.log_tail()


def test_unknown_and_silent_nodes_are_refused(pair, dsn):
    a, _ = pair
    status, reply = call(a, "/nodes/node-nowhere/drain", post=True)
    assert status == 404 and "node-nowhere" in reply["error"]["message"], reply
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO pulse_processes (node_id, role, idx, pid, heartbeat_at) "
                     "VALUES ('node-gone', 'master', 0, 1, now() - interval '10 minutes')")
    status, reply = call(a, "/nodes/node-gone/resume", post=True)
    assert status == 409 and "stopped heartbeating" in reply["error"]["message"], reply
    request = urllib.request.Request(a.url + "/nodes/node-b/drain", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=15)
    assert refused.value.code == 401


def test_node_a_shows_node_b_workers_rss_and_restarts(pair):
    a, b = pair

    def b_workers() -> list[dict[str, Any]]:
        return [p for p in node_view(a, "node-b")["processes"] if p["role"] == "worker"]
    # node-b's scheduler writes its children into the registry once they
    # run: a worker still starting may be missing or without its RSS yet.
    wait_until(lambda: len(b_workers()) == 2 and all((w["rss_mb"] or 0) > 0 for w in b_workers()),
               timeout=WAIT_S, message=f"node-a never saw node-b's two workers: {b_workers()}")
    assert [w["restarts"] for w in b_workers()] == [0, 0]
    master = next(p for p in node_view(a, "node-b")["processes"] if p["role"] == "master")
    assert master["rss_mb"] > 0
    victim = next(pid for pid, title in b.workers().items() if "worker 1 " in title + " ")
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: [w["restarts"] for w in b_workers() if w["idx"] == 1] == [1],
               timeout=WAIT_S, message=f"node-a never saw the restart: {b_workers()}")
    assert [w["restarts"] for w in b_workers() if w["idx"] == 2] == [0]
