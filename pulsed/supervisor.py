"""The master: forks and supervises one scheduler and N workers.

Signal handlers only record the signal (through `signal.set_wakeup_fd`);
everything happens in one loop that also serves the control socket with
`selectors`: handle signals, reap children, stop those that overran or went
silent, spawn up to the desired count, publish status. No threads, and no
database connection held: the master opens a short-lived one only to release
the leases of a worker it saw die.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import selectors
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psycopg
from setproctitle import setproctitle

import pulsed
from pulsed import logring, metrics
from pulsed.board import MAX_SLOTS, Board, ChildState
from pulsed.children import (ChildContext, ChildRuntime, become_subreaper, live_children,
                             start_child)
from pulsed.config import Config, load_config
from pulsed.control.protocol import INVALID_ARGUMENT, ControlError, resolve_workers
from pulsed.db.connect import connect
from pulsed.db.store import Store
from pulsed.errors import (CHILD_BOOT_ERROR, CHILD_RECYCLE, ConfigError, EXIT_OK,
                           PulseError)
from pulsed.jobs import Outcome
from pulsed.listener import ApiListener
from pulsed.node import NodeClaim, pulsed_alive
from pulsed.roles import SNAPSHOT_FILE, scheduler_main, worker_main, worker_owner
from pulsed.systemd import Notifier

log = logging.getLogger(__name__)

TICK_S = 0.25
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
STABLE_UPTIME_S = 10.0  # a child that ran this long was not crash-looping
HARD_TIMEOUT_GRACE_S = 2.0  # past a job's timeout before the master steps in
# A worker over worker.max_rss_mb recycles after its job; one this many
# times over it is killed mid-job (a job that keeps growing never ends).
RSS_HARD_LIMIT_FACTOR = 1.5
KILL_AFTER_TERM_S = 1.0
FAST_STOP_KILL_S = 2.0
RELOAD_HANDOVER_S = 15.0  # old workers leave once new ones are up, or after this
RELEASE_RETRY_S = 1.0
BOOT_GRACE_S = 30.0  # no worker up this long after start is degraded, failures or not
DEGRADED_REASON_CHARS = 200  # of the reason, in STATUS= and the process title
LIVE_WORKER = (ChildState.IDLE, ChildState.BUSY, ChildState.DRAINING)
UNSTARTED = "unstarted"  # a release that gives back jobs a dead worker never started

# A reload briefly runs two generations side by side; both must fit the board.
MAX_WORKERS = MAX_SLOTS // 2 - 4


def api_main(runtime: ChildRuntime) -> int:
    """The HTTP API child. pulsed.http is imported here, after the fork:
    only this child serves HTTP, and the import (wsgiref, http.server,
    email) was ~14 ms of every start-up before the first worker forked."""
    from pulsed.http import api_main as serve
    return serve(runtime)


ROLE_MAINS: dict[str, Callable[[ChildRuntime], int]] = {
    "worker": worker_main, "scheduler": scheduler_main, "api": api_main}


@dataclass
class Child:
    """A running child as the master tracks it."""

    role: str
    index: int
    slot: int
    pid: int
    generation: int
    started_at: float
    stopping: bool = False
    term_sent_at: float | None = None  # a stop asked; escalated to SIGKILL after stop_timeout
    kill_at: float | None = None
    kill_reason: str | None = None  # "timeout" | "heartbeat" | "stop"
    timed_out_jobs: tuple[int, ...] = ()  # the jobs whose deadline made us kill it
    rss_killed: int = 0  # the RSS (bytes) that made us kill it


@dataclass
class Place:
    """A (role, index) place and its history across restarts."""

    restarts: int = 0
    failures: int = 0  # consecutive early exits
    respawn_at: float | None = None  # set while waiting to respawn
    last_error: str = ""


class Supervisor:
    def __init__(self, config: Config, dsn: str, *, node: NodeClaim | None = None) -> None:
        self.config = config
        self.dsn = dsn
        self.node_id = config.daemon.node_id
        self.node = node  # None: not claimed (tests driving the master by hand)
        self.desired_workers = min(config.daemon.workers, MAX_WORKERS)
        self.board = Board()
        self.children: dict[int, Child] = {}
        self.places: dict[tuple[str, int], Place] = {}
        self.free_slots = list(range(self.board.slots - 1, -1, -1))
        self.generation = 0
        self.state = "running"  # running | draining | drained | stopping
        self.stop_deadline: float | None = None
        self.fast_stop = False
        self.reload_started: float | None = None
        self.pending_releases: list[tuple[list[str], str, str, list[int] | None]] = []
        # The previous master's workers still alive at start (their lease
        # owner names): released as each one goes.
        self.previous_workers: set[str] = set()
        self.next_release_try = 0.0
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.selector = selectors.DefaultSelector()
        self.notifier = Notifier()
        self.control: Any = None  # the ControlServer, when one is attached
        self.api_listener = ApiListener()  # outlives api children: reloads refuse nothing
        self.log_ring = logring.LogRing()  # children's recent stderr lines (pulsectl logs)
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.exit_code = EXIT_OK
        self._ready_sent = False

    # -- the loop -----------------------------------------------------------------

    def run(self) -> int:
        become_subreaper()
        self._install_signals()
        self.selector.register(self._signal_r, selectors.EVENT_READ, self._read_signals)
        if self.control is not None:
            self.control.register(self.selector)
        self.release_previous_incarnation()
        log.info("pulsed %s master started (node %s, %d workers)", pulsed.__version__,
                 self.node_id, self.desired_workers)
        while not self._finished():
            self.tick()
            for key, _ in self.selector.select(TICK_S):
                key.data()
        self._shutdown()
        return self.exit_code

    def tick(self) -> None:
        now = time.monotonic()
        self.reap()
        self.end_orphans()
        self.watch_children(now)
        if self.state != "stopping":
            self.reconcile(now)
            self._finish_reload(now)
        else:
            self._enforce_stop_deadline(now)
        self._release_previous_workers_gone()
        self._retry_releases(now)
        self._update_drain_state()
        if self.control is not None:
            self.control.tick(now)
        self._publish(now)

    def _finished(self) -> bool:
        return self.state == "stopping" and not self.children

    # -- signals --------------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                       signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD):
            # The C handler writes the number to the wakeup pipe; the Python
            # one does nothing, so no work ever happens inside a handler.
            signal.signal(signum, _record_only)

    def _read_signals(self) -> None:
        try:
            data = os.read(self._signal_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            self.handle_signal(signum)

    def handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # the tick reaps
        if signum == signal.SIGINT and self.state == "stopping":
            # A second Ctrl-C: the operator will not wait (as gunicorn does).
            log.info("interrupted again: stopping now")
            self.stop(now=True)
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.stop(now=False)
        elif signum == signal.SIGQUIT:
            self.stop(now=True)
        elif signum == signal.SIGHUP:
            try:
                self.reload()
            except PulseError:
                pass  # reload() logged it; the running config stays
        elif signum == signal.SIGTTIN:
            self._scale_by_signal("+1")
        elif signum == signal.SIGTTOU:
            self._scale_by_signal("-1")

    # -- children: spawn, reap, watch ---------------------------------------------

    def spawn(self, role: str, index: int) -> Child:
        slot = self.free_slots.pop()
        self.board.reset(slot, role, index)
        listener = self.api_listener.for_child(self.config.api.listen) if role == "api" else None
        log_pipe = self.log_ring.pipe()  # the child's stderr, read into the ring
        ctx = ChildContext(role=role, index=index, slot=slot, board=self.board,
                           config=self.config, dsn=self.dsn, master_pid=os.getpid(),
                           after_fork=functools.partial(self._close_in_child, log_pipe),
                           listener=listener,
                           instance=self.node.instance if self.node else "")
        try:
            pid = start_child(ctx, ROLE_MAINS[role])
        except BaseException:
            os.close(log_pipe[0])
            os.close(log_pipe[1])
            raise
        finally:
            if listener is not None:
                listener.close()  # the child's copy; the master keeps its own
        self.log_ring.watch(self.selector, *log_pipe, role, index)
        child = Child(role, index, slot, pid, self.generation, time.monotonic())
        self.children[pid] = child
        place = self.places.setdefault((role, index), Place())
        place.respawn_at = None
        log.info("started %s %d (pid %d)", role, index, pid)
        return child

    def _close_in_child(self, log_pipe: tuple[int, int]) -> None:
        """Runs in a freshly forked child: drop the master's descriptors;
        stderr goes to the master's log ring."""
        self.log_ring.close_in_child()
        os.close(log_pipe[0])
        logring.to_stderr(log_pipe[1])
        if self.control is not None:
            self.control.close_in_child()
        self.api_listener.close()  # only the api child serves, on its own copy
        for fd in (self._signal_r, self._signal_w, self.selector.fileno()):
            try:
                os.close(fd)
            except OSError:
                pass

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            metrics.child_reaped(pid)
            if child is not None:  # not ours (e.g. a subprocess): ignore
                self.child_exited(child, os.waitstatus_to_exitcode(status))

    def end_orphans(self) -> None:
        """Kill the processes this master adopted (as the subreaper): the
        descendants of a child that died, which nobody supervises. A
        handler's forked child would otherwise outlive its worker, and
        pulsed itself."""
        for pid in live_children(os.getpid()):
            if pid not in self.children:
                log.warning("ending process %d: a descendant of a child that is gone", pid)
                _kill(pid, signal.SIGKILL)

    def child_exited(self, child: Child, code: int) -> None:
        view = self.board.read(child.slot)
        how = _describe_exit(code)
        self.board.reset(child.slot)
        self.free_slots.append(child.slot)
        place = self.places.setdefault((child.role, child.index), Place())
        if child.role == "worker":
            self._release_dead_worker(child, code, [entry.job_id for entry in view.jobs])
        expected = child.stopping or code == CHILD_RECYCLE
        if not child.stopping:
            metrics.child_restarted(child.role, metrics.restart_reason(code, child.kill_reason))
        log_level = logging.INFO if expected else logging.WARNING
        if child.kill_reason == "stop" and child.role == "worker":  # ours, not a crash
            how += " at the stop deadline; its running jobs are recorded interrupted and run again"
        log.log(log_level, "%s %d (pid %d) %s", child.role, child.index, child.pid, how)
        if expected:
            place.failures = 0
            if code == CHILD_RECYCLE and child.generation == self.generation:
                place.respawn_at = time.monotonic()
            return
        self._schedule_respawn(child, place, code, view.message or how)

    def _schedule_respawn(self, child: Child, place: Place, code: int, error: str) -> None:
        now = time.monotonic()
        early = code == CHILD_BOOT_ERROR or now - child.started_at < STABLE_UPTIME_S
        place.failures = place.failures + 1 if early else 0
        delay = 0.0 if not place.failures else min(
            BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (place.failures - 1))
        place.respawn_at = now + delay
        place.restarts += 1
        place.last_error = error
        if delay:
            log.warning("%s %d restarts in %.1fs (failure %d in a row): %s", child.role,
                        child.index, delay, place.failures, error)

    def watch_children(self, now: float) -> None:
        """Kill children whose job overran its timeout or whose heartbeat
        went silent, and stopping children that ignore the stop; escalate
        TERM to KILL."""
        heartbeat_timeout = self.config.worker.heartbeat_timeout
        for child in list(self.children.values()):
            if child.kill_at is not None and now >= child.kill_at:
                _kill(child.pid, signal.SIGKILL)
                child.kill_at = None
                continue
            if child.kill_reason:
                continue
            view = self.board.read(child.slot)
            overdue = tuple(entry.job_id for entry in view.running if entry.deadline is not None
                            and now > entry.deadline + HARD_TIMEOUT_GRACE_S)
            if overdue:
                log.error("worker %d (pid %d): job(s) %s ran past their timeout; killing it",
                          child.index, child.pid, ", ".join(f"#{i}" for i in overdue))
                child.timed_out_jobs = overdue
                self._terminate(child, "timeout", now)
            elif self._over_rss_hard_limit(child, view.rss_bytes):
                log.error("worker %d (pid %d): RSS %d MiB over its hard limit (%.1f x "
                          "worker.max_rss_mb = %d MiB); killing it", child.index, child.pid,
                          view.rss_bytes // 2**20, RSS_HARD_LIMIT_FACTOR,
                          self._rss_hard_limit() // 2**20)
                child.kill_reason = "rss"
                child.rss_killed = view.rss_bytes
                _kill(child.pid, signal.SIGKILL)
            elif now - view.heartbeat > heartbeat_timeout:
                log.error("%s %d (pid %d): no heartbeat for %.0fs; killing it",
                          child.role, child.index, child.pid, now - view.heartbeat)
                child.kill_reason = "heartbeat"
                _kill(child.pid, signal.SIGKILL)
            elif child.term_sent_at is not None and \
                    now - child.term_sent_at > self.config.daemon.stop_timeout:
                log.warning("%s %d (pid %d) still running %.0fs after it was asked to stop; "
                            "killing it", child.role, child.index, child.pid,
                            now - child.term_sent_at)
                child.kill_reason = "stop"
                _kill(child.pid, signal.SIGKILL)

    def _rss_hard_limit(self) -> int:
        return int(self.config.worker.max_rss_mb * RSS_HARD_LIMIT_FACTOR * 2**20)

    def _over_rss_hard_limit(self, child: Child, rss_bytes: int) -> bool:
        """Read from the board each tick (the child's monitor measures it
        every half second), so a job cannot outgrow the limit unseen."""
        return (child.role == "worker" and self.config.worker.max_rss_mb > 0
                and rss_bytes > self._rss_hard_limit())

    def _terminate(self, child: Child, reason: str, now: float) -> None:
        child.kill_reason = reason
        _kill(child.pid, signal.SIGTERM)
        child.kill_at = now + KILL_AFTER_TERM_S

    def reconcile(self, now: float) -> None:
        """Spawn what is missing, stop what is extra, respawn when due."""
        if not any(c.role == "scheduler" and c.generation == self.generation
                   for c in self.children.values()):
            self._spawn_if_due("scheduler", 0, now)
        if self.config.api.enabled and not any(
                c.role == "api" and c.generation == self.generation
                for c in self.children.values()):
            self._spawn_if_due("api", 0, now)
        workers = self._current_workers()
        waiting = self._waiting_worker_places()
        for index in sorted(waiting, reverse=True):
            if len(workers) + len(waiting) <= self.desired_workers:
                break
            waiting.pop(index)
            self.places[("worker", index)].respawn_at = None
        for index in waiting:
            self._spawn_if_due("worker", index, now)
        missing = self.desired_workers - len(workers) - len(waiting)
        for _ in range(missing):
            self.spawn("worker", self._free_worker_index())
        if missing < 0:
            self._stop_extra_workers(-missing, now)

    def _spawn_if_due(self, role: str, index: int, now: float) -> None:
        place = self.places.get((role, index))
        if place is not None and place.respawn_at is not None and now < place.respawn_at:
            return
        self.spawn(role, index)

    def _current_workers(self) -> list[Child]:
        return [c for c in self.children.values()
                if c.role == "worker" and c.generation == self.generation and not c.stopping]

    def _waiting_worker_places(self) -> dict[int, Place]:
        running = {c.index for c in self._current_workers()}
        return {index: place for (role, index), place in self.places.items()
                if role == "worker" and place.respawn_at is not None and index not in running}

    def _free_worker_index(self) -> int:
        taken = {c.index for c in self._current_workers()}
        taken |= set(self._waiting_worker_places())
        index = 1
        while index in taken:
            index += 1
        return index

    def _stop_extra_workers(self, count: int, now: float) -> None:
        """Scale down: idle workers first, then the busy ones (which finish
        their job before leaving)."""
        def busy_last(child: Child) -> tuple[int, int]:
            return (self.board.read(child.slot).state == ChildState.BUSY, -child.index)
        for child in sorted(self._current_workers(), key=busy_last)[:count]:
            self._stop_child(child, now)

    def _stop_child(self, child: Child, now: float) -> None:
        child.stopping = True
        child.term_sent_at = now
        _kill(child.pid, signal.SIGTERM)

    # -- leases of dead workers -------------------------------------------------------

    def _release_dead_worker(self, child: Child, code: int, started: list[int]) -> None:
        """Account for every job a dead worker held, from its board table
        (the jobs it had started and not yet written): jobs it never started
        go back untouched; a job killed at its timeout gets `timeout`; the
        other started ones get `worker_died` (the attempt counts), or
        `interrupted` (it does not) when the kill was ours for a reason
        that is not theirs: a sibling's timeout, an operator's stop."""
        owner = worker_owner(self.node_id, child.index, child.pid)
        how = _describe_exit(code)
        self._release([owner], UNSTARTED, "never started", started)
        timed_out = [job_id for job_id in child.timed_out_jobs if job_id in started]
        if timed_out:
            self._release([owner], Outcome.TIMEOUT.value,
                          f"job ran past its timeout; worker {child.index} {how}", timed_out)
        if _interrupted_by_us(child, code):
            why = ("a job beside it ran past its timeout" if child.kill_reason == "timeout"
                   else "the worker was stopped past its stop timeout")
            self._release([owner], Outcome.INTERRUPTED.value,
                          f"interrupted: {why}; worker {child.index} (pid {child.pid}) {how}",
                          None)
        else:
            self._release([owner], Outcome.WORKER_DIED.value, _died_message(child, how), None)

    def _release(self, owners: list[str], outcome: str, message: str,
                 job_ids: list[int] | None) -> None:
        self.pending_releases.append((owners, outcome, message, job_ids))
        self._retry_releases(time.monotonic(), force=True)

    def _retry_releases(self, now: float, force: bool = False) -> None:
        if not self.pending_releases or (now < self.next_release_try and not force):
            return
        try:
            with connect(self.dsn, "master", pooler=self.config.database.pooler) as conn:
                store = Store(conn)
                while self.pending_releases:
                    owners, outcome, message, job_ids = self.pending_releases[0]
                    if outcome == UNSTARTED:
                        released = store.give_back_owner(owners, started=job_ids or [])
                    else:
                        released = store.release_owners(
                            owners, outcome=outcome, message=message,
                            error_class=_error_class(outcome), job_ids=job_ids,
                            poison_after=self.config.worker.poison_after)
                    metrics.leases_released(released, outcome)
                    if released:
                        log.warning("released %d job(s) of %s (%s): %s", len(released),
                                    ", ".join(owners), outcome, [r["id"] for r in released])
                        store.notify(sorted({r["queue"] for r in released}))
                    self.pending_releases.pop(0)
        except psycopg.Error as exc:
            log.warning("could not release leases yet (%s); lease expiry is the fallback", exc)
            self.next_release_try = now + RELEASE_RETRY_S

    def release_previous_incarnation(self) -> None:
        """Leases a previous master of this node left (it was killed): those
        of its workers that are gone. A worker of the dead master may still
        be finishing its job (it notices within seconds and stops): its
        lease is left to it, and to lease expiry if it never writes. Pids
        are checked only where they mean something (the previous master
        ran on this host); elsewhere lease expiry frees everything."""
        if self.node is not None and not self.node.previous_on_this_host():
            log.info("the previous pulsed of node %s ran elsewhere: its leases expire",
                     self.node_id)
            return
        try:
            with connect(self.dsn, "master", pooler=self.config.database.pooler) as conn:
                store = Store(conn)
                owners = store.owners_running(f"{self.node_id}/worker-")
                gone = [owner for owner in owners if not _owner_alive(owner)]
                released = store.release_owners(
                    gone, outcome=Outcome.WORKER_DIED.value,
                    message="the previous pulsed on this node died while the job ran",
                    error_class="WorkerDied", poison_after=self.config.worker.poison_after)
        except psycopg.Error as exc:
            log.warning("could not recover leases of a previous run: %s", exc)
            return
        metrics.leases_released(len(released), "previous_master")
        if released:
            log.warning("recovered %d job(s) left running by a previous pulsed: %s",
                        len(released), [r["id"] for r in released])
        self.previous_workers = set(owners) - set(gone)
        if self.previous_workers:
            log.warning("left the jobs of %s to them: still running after their master died",
                        ", ".join(sorted(self.previous_workers)))

    def _release_previous_workers_gone(self) -> None:
        """A previous master's worker that was still finishing its job at
        start has left (it stops within seconds of its master's death):
        what it still held is released now, not at lease expiry."""
        gone = [owner for owner in self.previous_workers if not _owner_alive(owner)]
        if gone:
            self.previous_workers.difference_update(gone)
            self._release(gone, Outcome.WORKER_DIED.value,
                          "the previous pulsed on this node died while the job ran; its worker "
                          "left without finishing it", None)

    # -- commands (signals and the control socket) ----------------------------------------

    def scale(self, workers: int | str) -> dict[str, Any]:
        self.desired_workers = resolve_workers(workers, self.desired_workers,
                                               maximum=MAX_WORKERS)
        log.info("scaling to %d workers", self.desired_workers)
        return {"workers": self.desired_workers}

    def restart(self, role: str, index: int) -> dict[str, Any]:
        """Replace one child gracefully: it stops as in a scale-down (its
        jobs finish, up to stop_timeout), and reconcile() starts its
        successor (a worker's at once, beside it; the scheduler's and the
        API's once it has left). Asked for: not a crash, not counted as one."""
        child = next((c for c in self.children.values() if c.role == role and c.index == index
                      and c.generation == self.generation and not c.stopping), None)
        if child is None:
            raise ControlError(INVALID_ARGUMENT, f"no running {role} {index} on this node")
        log.info("restarting %s %d (pid %d) as asked", role, index, child.pid)
        self._stop_child(child, time.monotonic())
        return {"role": role, "index": index, "pid": child.pid}

    def logs(self, role: str | None, index: int | None, lines: int,
             after: int | None) -> dict[str, Any]:
        found = self.log_ring.tail(role=role, index=index, lines=lines, after=after)
        return {"lines": [line._asdict() for line in found], "last_seq": self.log_ring.last_seq}

    def _scale_by_signal(self, step: str) -> None:
        try:
            self.scale(step)
        except PulseError as exc:
            log.warning("ignored %s: %s", "TTIN" if step == "+1" else "TTOU", exc)

    def drain(self) -> dict[str, Any]:
        if self.state in ("running",):
            self.state = "draining"
            log.info("draining: claiming nothing new")
        self.board.draining = True
        self._update_drain_state()
        return {"state": self.state}

    def resume(self) -> dict[str, Any]:
        self.board.draining = False
        if self.state in ("draining", "drained"):
            self.state = "running"
            log.info("resumed")
        return {"state": self.state}

    def reload(self) -> dict[str, Any]:
        if self.state == "stopping":
            return {"reloaded": False}
        self.notifier.reloading()
        try:
            new = load_config(self.config.source) if self.config.source else self.config
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            self.notifier.status(f"reload failed: {exc}")
            raise
        if new.database.url != self.config.database.url:
            log.warning("database.url changed; it takes effect on restart, not reload")
        if new.daemon.workers != self.config.daemon.workers:
            self.desired_workers = min(new.daemon.workers, MAX_WORKERS)
        if not new.api.enabled:
            self.api_listener.close()  # else the kernel would queue connections nobody takes
        self.config = new
        self.generation += 1
        self.reload_started = time.monotonic()
        log.info("reloading: starting generation %d", self.generation)
        return {"reloaded": True, "generation": self.generation}

    def _finish_reload(self, now: float) -> None:
        """Old children leave once the new generation is up (or after a while)."""
        if self.reload_started is None:
            return
        new = [c for c in self.children.values() if c.generation == self.generation]
        up = all(self.board.read(c.slot).state != ChildState.STARTING for c in new)
        if not (up and len(new) >= min(1, self.desired_workers)) and \
                now - self.reload_started < RELOAD_HANDOVER_S:
            return
        for child in list(self.children.values()):
            if child.generation < self.generation and not child.stopping:
                self._stop_child(child, now)
        self.reload_started = None
        self.notifier.send(READY=1, STATUS=self._status_line())

    def stop(self, now: bool = False) -> dict[str, Any]:
        if self.state == "stopping":
            if now and not self.fast_stop:
                self._begin_fast_stop()
            return {"state": "stopping"}
        self.state = "stopping"
        self.notifier.stopping()
        self.api_listener.close()  # new connections are refused, not left waiting
        clock = time.monotonic()
        if now:
            self._begin_fast_stop()
        else:
            log.info("stopping: running jobs get %.0fs to finish", self.config.daemon.stop_timeout)
            self.stop_deadline = clock + self.config.daemon.stop_timeout
            for child in self.children.values():
                self._stop_child(child, clock)
        return {"state": "stopping"}

    def _begin_fast_stop(self) -> None:
        log.info("fast stop")
        self.fast_stop = True
        self.stop_deadline = time.monotonic() + FAST_STOP_KILL_S
        for child in self.children.values():
            child.stopping = True
            _kill(child.pid, signal.SIGQUIT)

    def _enforce_stop_deadline(self, now: float) -> None:
        if self.stop_deadline is None or now < self.stop_deadline:
            return
        for child in self.children.values():
            if child.kill_reason != "stop":
                log.warning("%s %d (pid %d) still running at the stop deadline; killing it",
                            child.role, child.index, child.pid)
                child.kill_reason = "stop"
                _kill(child.pid, signal.SIGKILL)

    def running_jobs(self) -> int:
        return sum(len(self.board.read(c.slot).running) for c in self.children.values()
                   if c.role == "worker")

    def is_stopping(self) -> bool:
        return self.state == "stopping"

    def _update_drain_state(self) -> None:
        if self.state == "draining" and self.running_jobs() == 0:
            self.state = "drained"
            log.info("drained: no job runs on this node")
        elif self.state == "drained" and self.running_jobs() > 0:
            self.state = "draining"

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        snapshot = self._read_snapshot()
        degraded = self.degraded()
        leader = snapshot.get("leader") or {"node_id": None, "term": None}
        leader = {"node_id": leader.get("node_id"), "term": leader.get("term"),
                  "is_me": leader.get("node_id") == self.node_id}
        return {
            "master": {"pid": os.getpid(), "state": self.state,
                       "uptime_s": round(time.monotonic() - self.started_at, 3),
                       "node_id": self.node_id, "version": pulsed.__version__,
                       "workers_desired": self.desired_workers,
                       "started_at": self.started_wall,
                       "degraded": degraded is not None, "degraded_reason": degraded},
            "leader": leader,
            "children": self._children_status(snapshot.get("progress") or {}),
            "queues": snapshot.get("queues", []),
            # waiting jobs of types no live worker handles: [{type, count}]
            "unhandled_types": snapshot.get("unhandled_types", []),
            "oldest_available_age_s": snapshot.get("oldest_available_age_s"),
            "nodes": snapshot.get("nodes", []),
            "paused_queues": snapshot.get("paused_queues", []),
            "snapshot_age_s": (round(time.time() - snapshot["written_at"], 3)
                               if "written_at" in snapshot else None),
        }

    def _children_status(self, progress: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per child; `progress` (job id -> report, from the
        scheduler's snapshot) gives a busy worker's first job's progress."""
        rows = []
        for child in sorted(self.children.values(), key=lambda c: (c.role != "scheduler", c.index)):
            view = self.board.read(child.slot)
            place = self.places.get((child.role, child.index), Place())
            rows.append({
                "role": child.role, "index": child.index, "pid": child.pid,
                "state": _child_state(child, view.state),
                "job": view.job_id, "job_type": view.job_type or None if view.job_id else None,
                "jobs": [entry.job_id for entry in sorted(view.running, key=lambda e: e.started)],
                "progress": progress.get(str(view.job_id)) if view.job_id else None,
                "jobs_done": view.jobs_done, "restarts": place.restarts,
                "rss_bytes": view.rss_bytes, "generation": child.generation,
                "error": view.database_error or place.last_error or None,
                **({"db_ok": not view.database_error} if child.role == "worker" else {}),
                **({"leader_term": view.term or None} if child.role == "scheduler" else {}),
            })
        running = {(c.role, c.index) for c in self.children.values()}
        for (role, index), place in sorted(self.places.items()):
            if place.respawn_at is not None and (role, index) not in running:
                rows.append({"role": role, "index": index, "pid": None, "state": "backoff",
                             "job": None, "job_type": None, "jobs": [], "jobs_done": 0,
                             "restarts": place.restarts, "rss_bytes": 0,
                             "generation": self.generation, "error": place.last_error or None,
                             "respawn_in_s": round(max(0.0, place.respawn_at - time.monotonic()), 3)})
        return rows

    def _read_snapshot(self) -> dict[str, Any]:
        path = Path(self.config.daemon.state_dir) / SNAPSHOT_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def degraded(self) -> str | None:
        """Why this node runs no job although it should (workers wanted, none
        up: say every one in boot-failure backoff), else None. Workers still
        starting, none failed yet, are a reason only BOOT_GRACE_S after start."""
        if self.desired_workers == 0 or self.state == "stopping":
            return None
        if any(c.role == "worker" and not c.stopping
               and self.board.read(c.slot).state in LIVE_WORKER for c in self.children.values()):
            return None
        failing = [f"worker {index}: {place.last_error}"
                   for (role, index), place in sorted(self.places.items())
                   if role == "worker" and place.failures]
        if not failing and time.monotonic() - self.started_at < BOOT_GRACE_S:
            return None
        reason = f"no worker up (0 of {self.desired_workers})"
        return f"{reason}; {failing[0]}" if failing else reason

    def _status_line(self) -> str:
        workers = self._current_workers()
        busy = sum(1 for c in workers if self.board.read(c.slot).job_id is not None)
        line = f"{self.state}: {len(workers)}/{self.desired_workers} workers, {busy} busy"
        degraded = self.degraded()
        return f"{line}; degraded: {degraded[:DEGRADED_REASON_CHARS]}" if degraded else line

    def _publish(self, now: float) -> None:
        line = self._status_line()
        setproctitle(f"pulsed: master [{self.node_id}] {line}")
        if not self._ready_sent and self._workers_up():
            self.notifier.ready(line)
            self._ready_sent = True
        else:  # before READY=1 too: a node whose workers cannot boot says so
            self.notifier.status(line)
        self.notifier.tick(now)

    def _workers_up(self) -> bool:
        workers = self._current_workers()
        return len(workers) >= self.desired_workers and all(
            self.board.read(c.slot).state != ChildState.STARTING for c in workers)

    def _shutdown(self) -> None:
        self.log_ring.drain()  # the children's last words, before the master's
        self._retry_releases(time.monotonic(), force=True)
        self.api_listener.close()
        if self.control is not None:
            self.control.close()
        self.selector.close()
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                       signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        os.close(self._signal_r)
        os.close(self._signal_w)
        log.info("pulsed master stopped")


def _child_state(child: Child, reported: ChildState) -> str:
    if child.stopping or child.kill_reason:
        return "stopping"
    if reported == ChildState.BOOT_FAILED:
        return "starting"
    return reported.name.lower()


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by signal {-code} ({signal.Signals(-code).name})"
    names = {0: "exited cleanly", CHILD_BOOT_ERROR: "could not start (boot error)",
             CHILD_RECYCLE: "left to be recycled"}
    return names.get(code, f"exited with status {code}")


def _interrupted_by_us(child: Child, code: int) -> bool:
    """Did the master end this worker for a reason that is not its jobs'
    fault (a sibling's timeout, a stop or recycle past its timeout)?"""
    if child.kill_reason in ("timeout", "stop"):
        return True
    # A fast stop's SIGQUIT ends a child with status 0; a stop's SIGKILL.
    return child.stopping and child.kill_reason != "heartbeat" and code in (0, -signal.SIGKILL)


def _died_message(child: Child, how: str) -> str:
    message = f"worker {child.index} (pid {child.pid}) {how}"
    if child.kill_reason == "rss":
        return (f"{message}: killed by the master at RSS {child.rss_killed // 2**20} MiB, over "
                f"{RSS_HARD_LIMIT_FACTOR:g} x worker.max_rss_mb")
    return message


def _owner_alive(owner: str) -> bool:
    """Is the worker a lease owner name names (.../worker-N/PID) alive?"""
    try:
        pid = int(owner.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return False
    return pulsed_alive(pid, "pulsed: worker")


def _error_class(outcome: str) -> str:
    return {"timeout": "JobTimeout", "worker_died": "WorkerDied",
            "interrupted": "Interrupted"}.get(outcome, outcome)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def _record_only(signum: int, frame: object) -> None:
    """Installed for every handled signal: the wakeup fd carries the number."""
