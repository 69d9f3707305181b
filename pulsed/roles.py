"""What each kind of child does once forked: the worker and the scheduler."""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from pulsed.api import handlers as default_handlers
from pulsed.board import ChildState
from pulsed.children import (ChildRuntime, boot_failed, end_descendants_with_worker,
                             exit_code_for, import_handlers)
from pulsed.config import Config, import_path
from pulsed.db.connect import connect
from pulsed.db.store import Store, TypeLimit
from pulsed.jobs import Job
from pulsed.leadership import Leadership
from pulsed.maintenance import leader_duties
from pulsed.output import JobTaggedStream
from pulsed.worker import Worker, WorkerOptions

log = logging.getLogger(__name__)

RECYCLE_JITTER = 0.1  # recycle after max_jobs * [1, 1.1) so workers part ways
SNAPSHOT_INTERVAL_S = 1.0
REGISTRY_HEARTBEAT_S = 5.0
NODE_ALIVE_S = 30.0  # a node heartbeating within this is shown alive
LOOP_SLEEP_S = 0.1
DEPTH_COST_FACTOR = 50  # queue depths use at most ~2% of this process's time
SNAPSHOT_FILE = "scheduler.json"


def worker_owner(node_id: str, index: int, pid: int) -> str:
    """The lease owner name of a worker: the master releases by it."""
    return f"{node_id}/worker-{index}/{pid}"


def type_limits(config: Config) -> tuple[TypeLimit, ...]:
    """The [types] with a cluster-wide concurrency or rate limit."""
    return tuple(
        TypeLimit(name, t.concurrency, t.rate.count if t.rate else None,
                  t.rate.per_seconds if t.rate else None)
        for name, t in sorted(config.types.items()) if t.concurrency or t.rate)


class BoardStatus:
    """The worker's status: its started jobs and its state, as plain
    stores into its board slot (the ledger calls the job methods). It also
    knows which job a thread runs, for the job prefix of printed lines."""

    def __init__(self, runtime: ChildRuntime) -> None:
        self.runtime = runtime
        self._titled: Job | None = None  # the job the process title names
        self._running: dict[int, Job] = {}
        self._thread = threading.local()  # .job: the sync job this thread runs

    def job_started(self, job: Job, deadline: float | None) -> None:
        self.runtime.slot.job_started(job.id, job.type, time.monotonic(), deadline)
        self.runtime.current_job = job
        self._running[job.id] = job
        self._thread.job = job  # a sync handler runs on the thread that starts it

    def job_finished(self, job: Job, jobs_done: int) -> None:
        self.runtime.slot.job_finished(job.id, jobs_done)
        if self.runtime.current_job is job:
            self.runtime.current_job = None
        self._running.pop(job.id, None)
        if getattr(self._thread, "job", None) is job:
            self._thread.job = None

    def jobs_cleared(self, jobs: list[Job]) -> None:
        self.runtime.slot.jobs_cleared([job.id for job in jobs])

    def job_deadline(self, job: Job, deadline: float) -> None:
        self.runtime.slot.job_deadline(job.id, deadline)

    def database_unreachable(self, error: str) -> None:
        """Shown as the child's db_ok / error in status, and counted in
        pulse_workers_database_unreachable."""
        self.runtime.slot.update(message=error)
        self.runtime.title_detail = "no database"

    def database_reachable(self) -> None:
        self.runtime.slot.update(message="")
        log.info("worker %d reached the database again", self.runtime.ctx.index)

    def idle(self) -> None:
        state = ChildState.DRAINING if self.runtime.draining() else ChildState.IDLE
        self.runtime.slot.update(state=state)
        self.runtime.title_detail = "drained" if self.runtime.draining() else "idle"
        self.runtime.current_job = None

    def job_for_output(self) -> Job | None:
        """The job a printed line belongs to: this thread's, else the only
        job running (an async handler's, on the event loop's thread); None
        when several run and the line could be any one's."""
        job = getattr(self._thread, "job", None)
        # An async job is started on one thread and finished on another, so
        # a thread's own record may be stale: it counts while the job runs.
        if job is not None and job.id in self._running:
            return job
        running = list(self._running.values())  # one C-level copy under the GIL
        return running[0] if len(running) == 1 else None


def tag_job_output(status: BoardStatus) -> None:
    """Prefix what handlers print with their job (pulsed/output.py)."""
    sys.stdout = JobTaggedStream(sys.stdout, status.job_for_output)  # type: ignore[assignment]
    sys.stderr = JobTaggedStream(sys.stderr, status.job_for_output)  # type: ignore[assignment]


def worker_main(runtime: ChildRuntime) -> int:
    ctx = runtime.ctx
    end_descendants_with_worker()
    try:
        import_handlers(ctx.config.worker.handlers, import_path(ctx.config))
    except BaseException as exc:  # noqa: BLE001 - any import failure is a boot error
        return boot_failed(runtime, f"importing handlers {list(ctx.config.worker.handlers)}", exc)
    worker_config = ctx.config.worker
    options = WorkerOptions(
        owner=worker_owner(ctx.config.daemon.node_id, ctx.index, os.getpid()),
        lease_ttl=worker_config.lease_ttl, poll_interval=worker_config.poll_interval,
        prefetch=worker_config.prefetch, concurrency=worker_config.concurrency, queues=tuple(worker_config.queues),
        aging=worker_config.aging, limits=type_limits(ctx.config),
        type_timeouts={name: t.timeout for name, t in ctx.config.types.items() if t.timeout},
        type_attempts={name: t.max_attempts for name, t in ctx.config.types.items()
                       if t.max_attempts},
        poison_after=worker_config.poison_after, sole_owner=True,
        max_result_bytes=worker_config.max_result_bytes,
        cancel_grace=worker_config.cancel_grace, node_id=ctx.config.daemon.node_id,
        pooler=ctx.config.database.pooler, listen_url=ctx.config.database.listen_url,
    )
    max_jobs = None
    if worker_config.max_jobs:
        max_jobs = int(worker_config.max_jobs * random.uniform(1, 1 + RECYCLE_JITTER))
    status = BoardStatus(runtime)
    tag_job_output(status)
    worker = Worker(ctx.dsn, options, registry=default_handlers, status=status)
    runtime.slot.update(state=ChildState.IDLE)
    runtime.title_detail = "idle"
    worker.run(should_stop=runtime.should_stop, paused=runtime.draining, max_jobs=max_jobs)
    if max_jobs is not None and worker.jobs_done >= max_jobs:
        runtime.recycle_requested = True
    return exit_code_for(runtime)


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
        if self._due("snapshot", SNAPSHOT_INTERVAL_S):
            self.write_snapshot(store)

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
        rows = [{"role": "master", "idx": 0, "pid": self.runtime.ctx.master_pid}]
        for view in self.runtime.ctx.board.used_slots():
            rows.append({"role": view.role, "idx": view.index, "pid": view.pid,
                         "info": {"state": view.state.name.lower(), "jobs_done": view.jobs_done}})
        return rows

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
            "written_at": time.time(),
        }
        path = Path(self.config.daemon.state_dir) / SNAPSHOT_FILE
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(snapshot))
        os.replace(tmp, path)

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
