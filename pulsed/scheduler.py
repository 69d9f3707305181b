"""The scheduler child: leader election, the leader's maintenance duties,
and, on every node, the process registry heartbeat and the snapshot of the
database that its master's status shows."""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any

import psycopg

from pulsed import metrics
from pulsed.board import ChildState, SlotView
from pulsed.children import ChildRuntime, current_rss, exit_code_for
from pulsed.control.client import ControlClient
from pulsed.db.connect import connect
from pulsed.db.store import Store
from pulsed.leadership import Leadership
from pulsed.maintenance import leader_duties
from pulsed.node_commands import NodeCommandInbox
from pulsed.status_report import NodeState, write_snapshot

log = logging.getLogger(__name__)

SNAPSHOT_INTERVAL_S = 1.0
REGISTRY_HEARTBEAT_S = 5.0
NODE_ALIVE_S = 30.0  # a node heartbeating within this is shown alive
LOOP_SLEEP_S = 0.1
DEPTH_COST_FACTOR = 50  # queue depths use at most ~2% of this process's time
CONNECTIONS_WARN = 0.8  # of max_connections (less the superusers' reserve) in use
CONNECTIONS_WARN_EVERY_S = 60.0
SNAPSHOT_WARN_EVERY_S = 60.0
MASTER_ASK_TIMEOUT_S = 5.0  # a drain or resume another node asked for, over the control socket


def scheduler_main(runtime: ChildRuntime) -> int:
    ctx = runtime.ctx
    leadership = Leadership(f"{ctx.config.daemon.node_id}/{os.getpid()}",
                            ctx.config.scheduler.leader_ttl)
    scheduler = SchedulerLoop(runtime, leadership)
    runtime.slot.update(state=ChildState.IDLE)
    runtime.title_detail = "follower"
    try:
        scheduler.run()
    finally:
        scheduler.shutdown()
    return exit_code_for(runtime)


class SchedulerLoop:
    """Elect, re-elect, and while leading run the maintenance duties, each
    at its own interval. Every node's scheduler also registers its node's
    processes and writes the snapshot its master's status shows (leader,
    queue depths, live nodes), so the master never queries the database."""

    def __init__(self, runtime: ChildRuntime, leadership: Leadership) -> None:
        self.runtime = runtime
        self.leadership = leadership
        self.config = runtime.ctx.config
        self.node_id = self.config.daemon.node_id
        self.duties = leader_duties(self.config, runtime.ctx.dsn)
        self.conn: psycopg.Connection | None = None
        self.due: dict[str, float] = {}
        self._depths: list[dict[str, Any]] = []
        self._depths_due = 0.0
        self._node_lost = False
        # Drain / resume asked from another node's console; alone there is
        # no master to ask (and the registry lists none, so none is asked).
        self.commands = None if runtime.ctx.alone else NodeCommandInbox(
            self.node_id, self._ask_master, listen=self.config.database.pooler is None)

    def run(self) -> None:
        failures = 0
        while not self.runtime.should_stop():
            try:
                self.poll()
                failures = 0
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
                # SCHEDULER_SESSION's lock or statement timeout: that
                # statement was cancelled, the session is fine; the duty
                # runs again at its next interval.
                log.warning("scheduler: a statement was cancelled (%s)", exc)
            except psycopg.Error as exc:
                if not isinstance(exc, psycopg.OperationalError) and not self._broken():
                    raise
                # The connection is gone (ended by the server after a stall
                # in a transaction: IdleInTransactionSessionTimeout, say).
                failures += 1
                self._drop_connection(exc, failures)
                continue
            # between polls, once: the first cron enqueue or reaped lease built
            # the metrics (importing prometheus_client, 20-60 ms) in its tick,
            # the reaper's before its wake-up was sent
            metrics.prepare()
            time.sleep(LOOP_SLEEP_S)

    def _broken(self) -> bool:
        return self.conn is not None and self.conn.broken

    def poll(self) -> None:
        store = self.store()
        if self._due("election", self.leadership.ttl / 3):
            self.leadership.refresh(store)
            self._report()
        if self.leadership.is_leader:
            for duty in self.duties:
                if self._due(type(duty).__name__, duty.interval):
                    duty.run_once(store, self.leadership)
        if self._due("registry", REGISTRY_HEARTBEAT_S):
            store.processes_heartbeat(self.node_id, self._processes())
            self._node_heartbeat(store)
        if self._due("snapshot", SNAPSHOT_INTERVAL_S) and not self.runtime.ctx.alone:
            self.write_snapshot(store)  # for the master's status; alone, there is none
        if self.commands is not None:
            self.commands.run_once(store)

    def _ask_master(self, command: str) -> str:
        """Carry out a drain or resume another node asked for: as `pulsectl`
        would, over this node's control socket; the node's state after it."""
        reply = ControlClient(self.config.daemon.socket_path,
                              timeout=MASTER_ASK_TIMEOUT_S).request(command)
        return str(reply.get("state"))

    def _node_heartbeat(self, store: Store) -> None:
        """Keep this start's hold on the node id (pulsed/node.py) fresh."""
        instance = self.runtime.ctx.instance
        if instance and not store.node_instance_heartbeat(self.node_id, instance) \
                and not self._node_lost:
            self._node_lost = True
            log.error("node id %s is held by another pulsed start now (this one was presumed "
                      "dead); give each pulsed its own daemon.node_id", self.node_id)

    def _due(self, name: str, interval: float) -> bool:
        now = time.monotonic()
        if now < self.due.get(name, 0.0):
            return False
        self.due[name] = now + interval
        return True

    def _processes(self) -> list[dict[str, Any]]:
        """This node's registry rows. Their info carries what another node's
        console shows of this one (it cannot ask this master): each child's
        state, jobs done, RSS and restarts from the board, and the master's
        RSS and the node's drain state."""
        ctx = self.runtime.ctx
        views = ctx.board.used_slots()
        rows = [] if ctx.alone else [{"role": "master", "idx": 0, "pid": ctx.master_pid,
                                      "info": {"state": self._node_state(views),
                                               "rss_bytes": current_rss(ctx.master_pid)}}]
        for view in views:
            rows.append({"role": view.role, "idx": view.index, "pid": view.pid,
                         "info": {"state": view.state.name.lower(), "jobs_done": view.jobs_done,
                                  "rss_bytes": view.rss_bytes, "restarts": view.restarts}})
        return rows

    def _node_state(self, views: list[SlotView]) -> str:
        """running, draining or drained (as `pulsectl status` says), from the
        board's drain flag and the jobs the workers hold."""
        if not self.runtime.ctx.board.draining:
            return NodeState.RUNNING.value
        busy = any(view.running for view in views if view.role == "worker")
        return (NodeState.DRAINING if busy else NodeState.DRAINED).value

    def _report(self) -> None:
        leading = self.leadership.is_leader
        self.runtime.slot.update(term=self.leadership.term if leading else 0,
                                 state=ChildState.IDLE)
        self.runtime.title_detail = (f"leader term {self.leadership.term}" if leading
                                     else "follower")

    def write_snapshot(self, store: Store) -> None:
        depths = self._queue_depths(store)
        snapshot: dict[str, Any] = {
            "leader": _leader_view(store.leader_get(), self.leadership),
            "queues": depths,
            "unhandled_types": store.unhandled_types(depths),
            "oldest_available_age_s": store.oldest_available_age(),
            "paused_queues": store.paused_queues(),
            "nodes": [{"node_id": n["node_id"], "processes": n["processes"],
                       "heartbeat_at": n["heartbeat_at"].isoformat()}
                      for n in store.nodes_alive(NODE_ALIVE_S)],
            "progress": store.running_progress(self.node_id),
            "connections": self._connections(store),
            "written_at": time.time(),
        }
        try:
            write_snapshot(self.config.daemon.state_dir, snapshot)
        except OSError as exc:
            # The state dir full, read-only or removed: the snapshot only
            # feeds `pulsectl status`; the scheduler (the leader, maybe)
            # crash-looped on it, and cron, the reaper and the election with it.
            if self._due("snapshot warning", SNAPSHOT_WARN_EVERY_S):
                log.warning("scheduler: cannot write the status snapshot in %s (%s); "
                            "`pulsectl status` shows the leader and queues as of its "
                            "last one (snapshot_age_s)", self.config.daemon.state_dir, exc)

    def _connections(self, store: Store) -> dict[str, int]:
        """The server's connections (cluster-wide: every node's Pulse and the
        applications'); the leader warns before they run out, since a
        worker that cannot connect runs nothing."""
        usage = store.connection_usage()
        if (self.leadership.is_leader and usage["total"] >= CONNECTIONS_WARN * usage["available"]
                and self._due("connections warning", CONNECTIONS_WARN_EVERY_S)):
            log.warning("the database has %d of its %d connections in use (%d of them Pulse's); "
                        "new processes may soon be refused: raise max_connections, fewer "
                        "workers, or a pooler (docs/pgbouncer.md)", usage["total"],
                        usage["available"], usage["pulse"])
        return usage

    def _queue_depths(self, store: Store) -> list[dict[str, Any]]:
        """Counting a large backlog is a scan: sample it at most every
        DEPTH_COST_FACTOR times what the last count took, so it never costs
        more than a few percent of a core however big the table grows."""
        if time.monotonic() >= self._depths_due:
            started = time.monotonic()
            self._depths = store.queue_depths()
            cost = time.monotonic() - started
            self._depths_due = time.monotonic() + max(SNAPSHOT_INTERVAL_S,
                                                      cost * DEPTH_COST_FACTOR)
        return self._depths

    def store(self) -> Store:
        if self.conn is None or self.conn.closed:
            ctx = self.runtime.ctx
            self.conn = scheduler_connect(ctx.dsn, ctx.config.database.pooler)
            if self.commands is not None:
                self.commands.connected(Store(self.conn))
        return Store(self.conn)

    def _drop_connection(self, exc: Exception, failures: int) -> None:
        delay = min(5.0, 0.2 * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
        log.warning("scheduler lost its database connection (%s); retrying in %.1fs", exc, delay)
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not self.runtime.should_stop():
            time.sleep(0.1)

    def shutdown(self) -> None:
        """Resign (so another node leads at once) and close."""
        try:
            if self.leadership.term is not None:
                self.leadership.resign(self.store())
        except psycopg.Error as exc:
            log.warning("could not resign leadership: %s", exc)
        if self.conn is not None:
            self.conn.close()


def scheduler_connect(dsn: str, pooler: str | None = None) -> psycopg.Connection:
    """The scheduler's connection: autocommit, with SCHEDULER_SESSION's
    timeouts, so no maintenance transaction it leaves open (frozen by
    SIGSTOP, say) holds the lease row for longer than they allow."""
    return connect(dsn, "scheduler", pooler=pooler)


def _leader_view(row: dict[str, Any] | None, mine: Leadership) -> dict[str, Any]:
    if not row or not row["live"]:
        return {"node_id": None, "term": row["term"] if row else None, "is_me": False}
    node_id = row["leader_id"].rsplit("/", 1)[0]
    return {"node_id": node_id, "term": row["term"],
            "is_me": row["leader_id"] == mine.leader_id and mine.is_leader,
            "leader_id": row["leader_id"]}
