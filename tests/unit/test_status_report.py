"""The status report's JSON is SPEC §9's: these keys are a contract
(scripts and tests read them); add keys here when you add fields, never
rename one."""

from __future__ import annotations

from pulsed.status_report import (ChildInfo, ConnectionUsage, LeaderInfo, MasterInfo, NodeInfo, QueueDepth,
                                  StatusReport, TypeCount)

TOP_KEYS = {"master", "leader", "children", "queues", "unhandled_types",
            "oldest_available_age_s", "nodes", "paused_queues", "snapshot_age_s", "connections"}
MASTER_KEYS = {"pid", "state", "uptime_s", "node_id", "version", "workers_desired",
               "started_at", "degraded", "degraded_reason", "autoscale"}
CHILD_KEYS = {"role", "index", "pid", "state", "job", "job_type", "jobs", "progress",
              "jobs_done", "restarts", "rss_bytes", "generation", "error"}


def sample() -> StatusReport:
    return StatusReport(
        master=MasterInfo(pid=1, state="running", uptime_s=1.5, node_id="n1", version="0.1.0",
                          workers_desired=2, started_at=0.0),
        leader=LeaderInfo("n1", 3, True),
        children=[ChildInfo(role="scheduler", pid=2, state="idle", leader_term=3),
                  ChildInfo(role="worker", index=1, pid=3, state="busy", job=7, jobs=[7, 8],
                            job_type="email", db_ok=True),
                  ChildInfo(role="worker", index=2, state="backoff", error="boom",
                            respawn_in_s=1.0)],
        queues=[QueueDepth("email", "available", 4)], unhandled_types=[TypeCount("x", 1)],
        nodes=[NodeInfo("n1", 4, "2026-12-02T00:00:00+00:00")], paused_queues=["slow"],
        connections=ConnectionUsage(pulse=5, total=9, available=97))


def test_the_json_keys_are_spec_9s():
    data = sample().to_json()
    assert set(data) == TOP_KEYS
    assert set(data["master"]) == MASTER_KEYS
    assert set(data["leader"]) == {"node_id", "term", "is_me"}
    scheduler, worker, backoff = data["children"]
    assert set(scheduler) == CHILD_KEYS | {"leader_term"}
    assert set(worker) == CHILD_KEYS | {"db_ok"}
    assert set(backoff) == CHILD_KEYS - {"progress"} | {"respawn_in_s"}
    assert data["queues"] == [{"type": "email", "state": "available", "count": 4}]
    assert data["unhandled_types"] == [{"type": "x", "count": 1}]
    assert set(data["nodes"][0]) == {"node_id", "processes", "heartbeat_at"}
    assert data["connections"] == {"pulse": 5, "total": 9, "available": 97}


def test_from_json_round_trips_and_tolerates_other_versions():
    report = sample()
    assert StatusReport.from_json(report.to_json()) == report
    newer = report.to_json()
    newer["master"]["future_key"] = 1
    newer["children"][0]["future_key"] = 2
    assert StatusReport.from_json(newer) == report
    older = StatusReport.from_json({"master": {"pid": 1}, "children": [{"role": "worker"}]})
    assert older.master.state == "unknown" and older.children[0].jobs == []
    assert StatusReport.from_json(None) == StatusReport()
