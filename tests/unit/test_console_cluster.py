"""The console's cluster view: every node's RSS, restarts and drain state
come from the registry's info; this node's master status, fresher, wins
for its own processes."""

from __future__ import annotations

from typing import Any

from pulsed.http.console_views import _cluster_table, cluster_view


def row(node: str, role: str, idx: int, pid: int, info: dict[str, Any],
        age: float = 1.0) -> dict[str, Any]:
    return {"node_id": node, "role": role, "idx": idx, "pid": pid, "info": info,
            "heartbeat_age_s": age, "running": 0 if role == "worker" else None}


def test_remote_nodes_show_rss_restarts_and_state_from_the_registry() -> None:
    processes = [
        row("a", "master", 0, 10, {"state": "running", "rss_bytes": 40 << 20}),
        row("a", "worker", 1, 11, {"state": "idle", "rss_bytes": 30 << 20, "restarts": 0}),
        row("b", "master", 0, 20, {"state": "drained", "rss_bytes": 41 << 20}),
        row("b", "worker", 1, 21, {"state": "draining", "rss_bytes": 33 << 20, "restarts": 2}),
        row("c", "worker", 1, 31, {}, age=90.0),  # an older pulsed: no such info
    ]
    leader = {"leader_id": "b/20", "live": True}
    local = ("a", {11: {"pid": 11, "rss_bytes": 35 << 20, "restarts": 1}})
    nodes = {n["node_id"]: n for n in cluster_view(processes, leader, local)}
    a_worker = nodes["a"]["processes"][1]
    assert (a_worker["rss_mb"], a_worker["restarts"]) == (35.0, 1)  # the master's status
    b_master, b_worker = nodes["b"]["processes"]
    assert (b_master["rss_mb"], b_worker["rss_mb"], b_worker["restarts"]) == (41.0, 33.0, 2)
    assert (nodes["a"]["state"], nodes["b"]["state"], nodes["c"]["state"]) == (
        "running", "drained", None)
    assert nodes["b"]["leader"] and not nodes["c"]["alive"]
    assert nodes["c"]["processes"][0]["rss_mb"] is None
    html = _cluster_table(list(nodes.values()))
    assert "alive, drained" in html and "silent 90s" in html
