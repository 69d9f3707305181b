"""The master's status report: its child table and board, plus the
scheduler's snapshot of the database, as a `StatusReport`; and the one-line
summary systemd and the process title show."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable

import pulsed
from pulsed.board import SERVING_STATES, ChildState, SlotView
from pulsed.master.table import RSS_HARD_LIMIT_FACTOR, Child, ChildTable, KillReason, Place
from pulsed.status_report import (ChildInfo, ConnectionUsage, LeaderInfo, MasterInfo, NodeInfo, NodeState,
                                  QueueDepth, StatusReport, TypeCount)

BOOT_GRACE_S = 30.0  # no worker up this long after start is degraded, failures or not
DEGRADED_REASON_CHARS = 200  # of the reason, in STATUS= and the process title


@dataclass
class NodeView:
    """What the report reads from the master, besides its table."""

    table: ChildTable
    view: Callable[[Child], SlotView]  # a child's board slot
    node_id: str
    state: NodeState
    desired_workers: int
    uptime_s: float
    started_wall: float
    autoscale: dict[str, Any] | None = None


def build_report(node: NodeView, snapshot: dict[str, Any], now: float,
                 wall_now: float) -> StatusReport:
    leader = snapshot.get("leader") or {}
    degraded = degraded_reason(node)
    return StatusReport(
        master=MasterInfo(pid=os.getpid(), state=node.state.value,
                          uptime_s=round(node.uptime_s, 3), node_id=node.node_id,
                          version=pulsed.__version__, workers_desired=node.desired_workers,
                          started_at=node.started_wall, degraded=degraded is not None,
                          degraded_reason=degraded, autoscale=node.autoscale),
        leader=LeaderInfo(node_id=leader.get("node_id"), term=leader.get("term"),
                          is_me=leader.get("node_id") == node.node_id),
        children=children_rows(node, snapshot.get("progress") or {}, now),
        queues=[QueueDepth(q["type"], q["state"], q["count"]) for q in snapshot.get("queues", [])],
        unhandled_types=[TypeCount(t["type"], t["count"])
                         for t in snapshot.get("unhandled_types", [])],
        oldest_available_age_s=snapshot.get("oldest_available_age_s"),
        nodes=[NodeInfo(n["node_id"], n["processes"], n["heartbeat_at"])
               for n in snapshot.get("nodes", [])],
        paused_queues=list(snapshot.get("paused_queues", [])),
        snapshot_age_s=(round(wall_now - snapshot["written_at"], 3)
                        if "written_at" in snapshot else None),
        connections=(ConnectionUsage(**snapshot["connections"])
                     if snapshot.get("connections") else None),
    )


def children_rows(node: NodeView, progress: dict[str, Any], now: float) -> list[ChildInfo]:
    """One row per child, then one per place waiting out its backoff;
    `progress` (job id -> report) gives a busy worker's first job's."""
    table = node.table
    rows = []
    for child in sorted(table.children.values(), key=lambda c: (c.role != "scheduler", c.index)):
        view = node.view(child)
        place = table.places.get((child.role, child.index), Place())
        rows.append(ChildInfo(
            role=child.role, index=child.index, pid=child.pid, state=_child_state(child, view.state),
            job=view.job_id, job_type=view.job_type or None if view.job_id else None,
            jobs=[entry.job_id for entry in sorted(view.running, key=lambda e: e.started)],
            progress=progress.get(str(view.job_id)) if view.job_id else None,
            jobs_done=view.jobs_done, restarts=place.restarts, rss_bytes=view.rss_bytes,
            generation=child.generation, error=view.database_error or place.last_error or None,
            db_ok=not view.database_error, leader_term=view.term or None))
    running = {(c.role, c.index) for c in table.children.values()}
    for (role, index), place in sorted(table.places.items()):
        if place.respawn_at is not None and (role, index) not in running:
            rows.append(ChildInfo(role=role, index=index, state="backoff",
                                  restarts=place.restarts, generation=table.generation,
                                  error=place.last_error or None,
                                  respawn_in_s=round(max(0.0, place.respawn_at - now), 3)))
    return rows


def degraded_reason(node: NodeView) -> str | None:
    """Why this node runs no job although it should (workers wanted, none
    up: say every one in boot-failure backoff), else None. Workers still
    starting, none failed yet, are a reason only BOOT_GRACE_S after start."""
    if node.desired_workers == 0 or node.state is NodeState.STOPPING:
        return None
    if any(c.role == "worker" and not c.leaving and node.view(c).state in SERVING_STATES
           for c in node.table.children.values()):
        return None
    failing = [f"worker {index}: {place.last_error}"
               for (role, index), place in sorted(node.table.places.items())
               if role == "worker" and place.failures]
    if not failing and node.uptime_s < BOOT_GRACE_S:
        return None
    reason = f"no worker up (0 of {node.desired_workers})"
    return f"{reason}; {failing[0]}" if failing else reason


def status_line(node: NodeView) -> str:
    workers = node.table.current_workers()
    busy = sum(1 for c in workers if node.view(c).job_id is not None)
    line = f"{node.state.value}: {len(workers)}/{node.desired_workers} workers, {busy} busy"
    degraded = degraded_reason(node)
    return f"{line}; degraded: {degraded[:DEGRADED_REASON_CHARS]}" if degraded else line


def _child_state(child: Child, reported: ChildState) -> str:
    if child.shown_stopping:
        return "stopping"
    if reported == ChildState.BOOT_FAILED:
        return "starting"
    return reported.name.lower()


def kill_message(child: Child, signum: int, rss_hard_limit: int,
                 silent_s: float) -> tuple[int, str] | None:
    """The log level and line for a signal the table sends a child, or None."""
    what = f"{child.role} {child.index} (pid {child.pid})"
    reason = child.kill_reason
    if reason is KillReason.TIMEOUT and signum == signal.SIGTERM:
        jobs = ", ".join(f"#{i}" for i in child.timed_out_jobs)
        return logging.ERROR, f"{what}: job(s) {jobs} ran past their timeout; killing it"
    if reason is KillReason.RSS:
        return logging.ERROR, (f"{what}: RSS {child.rss_killed // 2**20} MiB over its hard limit "
                               f"({RSS_HARD_LIMIT_FACTOR:.1f} x worker.max_rss_mb = "
                               f"{rss_hard_limit // 2**20} MiB); killing it")
    if reason is KillReason.HEARTBEAT:
        return logging.ERROR, f"{what}: no heartbeat for {silent_s:.0f}s; killing it"
    if reason is KillReason.STOP and signum == signal.SIGKILL:
        return logging.WARNING, (f"{what} still running after it was asked to stop (past its "
                                 "stop timeout or the stop deadline); killing it")
    return None
