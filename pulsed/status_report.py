"""The status report: what `pulsectl status`, `pulsectl top`, the control
socket, `GET /status.json` and the status page all show.

Built in one place (pulsed/master/report.py) and read back by every
renderer through `StatusReport.from_json`, so a field added here is the one
edit a new column needs. The JSON is SPEC §9's: keys are added, never
renamed (tests/unit/test_status_report.py pins them). `from_json` is
lenient: a pulsectl newer than its pulsed reads missing keys as empty.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Mapping


class NodeState(str, Enum):
    """The master's own state (`master.state`)."""

    RUNNING = "running"
    DRAINING = "draining"  # claiming nothing new; jobs still running
    DRAINED = "drained"  # claiming nothing, running nothing
    STOPPING = "stopping"


# A child's `state` (SPEC §9): starting, idle, busy, draining, stopping, backoff.
CHILD_STATES = ("starting", "idle", "busy", "draining", "stopping", "backoff")


@dataclass
class MasterInfo:
    pid: int | None = None
    state: str = "unknown"
    uptime_s: float | None = None
    node_id: str | None = None
    version: str = ""
    workers_desired: int | None = None
    started_at: float | None = None
    degraded: bool = False
    degraded_reason: str | None = None
    autoscale: dict[str, Any] | None = None  # {min, max, pinned, last_change}; None: fixed count


@dataclass
class LeaderInfo:
    node_id: str | None = None
    term: int | None = None
    is_me: bool = False


@dataclass
class ChildInfo:
    role: str = ""
    index: int = 0
    pid: int | None = None
    state: str = ""
    job: int | None = None  # the first running job, or None
    job_type: str | None = None
    jobs: list[int] = field(default_factory=list)  # every job it runs
    progress: dict[str, Any] | None = None  # of `job`: {fraction, message, at}
    jobs_done: int = 0
    restarts: int = 0
    rss_bytes: int = 0
    generation: int = 0
    error: str | None = None
    db_ok: bool | None = None  # workers only
    leader_term: int | None = None  # the scheduler only
    respawn_in_s: float | None = None  # places waiting to respawn (state "backoff") only

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "role": self.role, "index": self.index, "pid": self.pid, "state": self.state,
            "job": self.job, "job_type": self.job_type, "jobs": list(self.jobs)}
        if self.state != "backoff":
            row["progress"] = self.progress
        row.update({"jobs_done": self.jobs_done, "restarts": self.restarts,
                    "rss_bytes": self.rss_bytes, "generation": self.generation,
                    "error": self.error})
        if self.state == "backoff":
            row["respawn_in_s"] = self.respawn_in_s
        elif self.role == "worker":
            row["db_ok"] = self.db_ok
        elif self.role == "scheduler":
            row["leader_term"] = self.leader_term
        return row


@dataclass
class QueueDepth:
    type: str = ""
    state: str = ""
    count: int = 0


@dataclass
class TypeCount:
    type: str = ""
    count: int = 0


@dataclass
class NodeInfo:
    node_id: str = ""
    processes: int = 0
    heartbeat_at: str | None = None


@dataclass
class ConnectionUsage:
    """The database server's client connections, cluster-wide."""

    pulse: int = 0  # every node's Pulse processes
    total: int = 0  # everyone's
    available: int = 0  # max_connections less superuser_reserved_connections


@dataclass
class StatusReport:
    master: MasterInfo = field(default_factory=MasterInfo)
    leader: LeaderInfo = field(default_factory=LeaderInfo)
    children: list[ChildInfo] = field(default_factory=list)
    queues: list[QueueDepth] = field(default_factory=list)
    unhandled_types: list[TypeCount] = field(default_factory=list)  # waiting, no live worker
    oldest_available_age_s: float | None = None
    nodes: list[NodeInfo] = field(default_factory=list)
    paused_queues: list[str] = field(default_factory=list)
    snapshot_age_s: float | None = None  # how old the scheduler's snapshot is
    connections: ConnectionUsage | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "master": vars(self.master).copy(),
            "leader": vars(self.leader).copy(),
            "children": [child.to_json() for child in self.children],
            "queues": [vars(q).copy() for q in self.queues],
            "unhandled_types": [vars(t).copy() for t in self.unhandled_types],
            "oldest_available_age_s": self.oldest_available_age_s,
            "nodes": [vars(n).copy() for n in self.nodes],
            "paused_queues": list(self.paused_queues),
            "snapshot_age_s": self.snapshot_age_s,
            "connections": vars(self.connections).copy() if self.connections else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> StatusReport:
        data = data or {}
        return cls(
            master=_build(MasterInfo, data.get("master")),
            leader=_build(LeaderInfo, data.get("leader")),
            children=[_build(ChildInfo, c) for c in data.get("children") or []],
            queues=[_build(QueueDepth, q) for q in data.get("queues") or []],
            unhandled_types=[_build(TypeCount, t) for t in data.get("unhandled_types") or []],
            oldest_available_age_s=data.get("oldest_available_age_s"),
            nodes=[_build(NodeInfo, n) for n in data.get("nodes") or []],
            paused_queues=list(data.get("paused_queues") or []),
            snapshot_age_s=data.get("snapshot_age_s"),
            connections=(_build(ConnectionUsage, data["connections"])
                         if data.get("connections") else None),
        )


def _build(kind: type, data: Mapping[str, Any] | None) -> Any:
    """An instance from a JSON object, ignoring keys it does not know (a
    newer pulsed) and defaulting those it lacks (an older one)."""
    if not isinstance(data, Mapping):
        return kind()
    known = kind.__dataclass_fields__
    return kind(**{k: v for k, v in data.items() if k in known})


# -- the scheduler's snapshot ------------------------------------------------------
# Every node's scheduler writes what the report needs from the database (leader,
# queue depths, live nodes, progress) to a file once a second, so the master
# answers `status` without a database connection of its own.

SNAPSHOT_FILE = "scheduler.json"


def write_snapshot(state_dir: str, snapshot: Mapping[str, Any]) -> None:
    path = Path(state_dir) / SNAPSHOT_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(snapshot))
        os.replace(tmp, path)  # readers see the old file or the new, never half of one
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: no half file left for every try
        raise


def read_snapshot(state_dir: str) -> dict[str, Any]:
    try:
        data = json.loads((Path(state_dir) / SNAPSHOT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
