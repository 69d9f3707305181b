"""The master: forks and supervises one scheduler, N workers and the API.

Signal handlers only record the signal (through `signal.set_wakeup_fd`);
everything happens in one loop that also serves the control socket with
`selectors`: handle signals, reap children, carry out what the child table
decides (pulsed/master/table.py), release dead workers' leases, publish
status. No threads, and no database connection held: the master opens a
short-lived one only to release the leases of a worker it saw die.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import selectors
import signal
import time
from typing import Any, Callable

from setproctitle import setproctitle

import pulsed
from pulsed import logring, metrics
from pulsed.board import Board, ChildState
from pulsed.children import ChildContext, become_subreaper, live_children, start_child
from pulsed.config import Config
from pulsed.db.connect import connect
from pulsed.db.store import Store
from pulsed.errors import CHILD_BOOT_ERROR, EXIT_OK
from pulsed.listener import ApiListener
from pulsed.master.autoscale import Load, load_from, make_autoscaler
from pulsed.master.commands import Commands
from pulsed.master.releases import LeaseReleases, dead_worker_releases
from pulsed.master.report import NodeView, build_report, kill_message, status_line
from pulsed.master.systemd import Notifier
from pulsed.master.table import (RSS_HARD_LIMIT_FACTOR, Action, Child, ChildTable, KillReason,
                                 Limits, Signal, Spawn, describe_exit)
from pulsed.node import NodeClaim
from pulsed.roles import ROLE_MAINS
from pulsed.status_report import NodeState, StatusReport, read_snapshot

log = logging.getLogger(__name__)

TICK_S = 0.25
AUTOSCALE_EVERY_S = 1.0
# What the host ran out of, for the operator (status, log) when a fork fails.
_LIMIT_HINTS = {
    errno.EAGAIN: " (the process limit is reached: RLIMIT_NPROC of pulsed's user, systemd's "
                  "TasksMax, a pids cgroup or kernel.pid_max)",
    errno.ENOMEM: " (out of memory)",
    errno.EMFILE: " (pulsed's open file limit, RLIMIT_NOFILE, is reached)",
    errno.ENFILE: " (the system's open file limit, fs.file-max, is reached)",
}
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                   signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)


def release_connect(dsn: str, pooler: str | None) -> Callable[[], Any]:
    """The master holds no connection: one, short-lived, per release round."""
    return lambda: connect(dsn, "master", pooler=pooler)


class Master(Commands):
    def __init__(self, config: Config, dsn: str, *, node: NodeClaim | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 kill: Callable[[int, int], None] | None = None) -> None:
        self.config = config
        self.dsn = dsn
        self.node_id = config.daemon.node_id
        self.node = node  # None: not claimed (tests driving the master by hand)
        self.clock = clock
        self.kill = kill or _kill
        self.desired_workers = config.daemon.workers
        self.autoscaler = make_autoscaler(config)
        self._next_autoscale = 0.0
        self.board = Board()
        self.table = ChildTable(self.board.slots)
        self.state = NodeState.RUNNING
        self.stop_deadline: float | None = None
        self.fast_stop = False
        self.reload_started: float | None = None
        self.reload_stalled = False  # logged once: the new generation is late
        self.reload_from: Config | None = None  # the config a reload replaced, until rolled back
        self.releases = LeaseReleases(release_connect(dsn, config.database.pooler),
                                      config.worker.poison_after)
        self.started_at = clock()
        self.started_wall = time.time()
        self.selector = selectors.DefaultSelector()
        self.notifier = Notifier()
        self.control: Any = None  # the ControlServer, when one is attached
        self.api_listener = ApiListener()  # outlives api children: reloads refuse nothing
        self.log_ring = logring.LogRing()  # children's recent stderr lines (pulsectl logs)
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.exit_code = EXIT_OK
        self._ready_sent = False
        self._recovered = False  # recover_previous_incarnation() ran

    def recover_previous_incarnation(self, store: Store | None = None) -> None:
        """Before the first fork: the leases a killed predecessor's workers
        left. pulsed's start passes its start connection (no connection of
        the master's own on the way to the first claim)."""
        self._recovered = True
        if self.node is not None and not self.node.previous_on_this_host():
            # Pids mean something only where the previous master ran.
            log.info("the previous pulsed of node %s ran elsewhere: its leases expire",
                     self.node_id)
            return
        self.releases.previous_incarnation(self.node_id, store)

    # -- the loop -----------------------------------------------------------------

    def run(self) -> int:
        become_subreaper()
        self._install_signals()
        self.selector.register(self._signal_r, selectors.EVENT_READ, self._read_signals)
        if self.control is not None:
            self.control.register(self.selector)
        if not self._recovered:
            self.recover_previous_incarnation()
        log.info("pulsed %s master started (node %s, %d workers)", pulsed.__version__,
                 self.node_id, self.desired_workers)
        next_tick = self.clock()
        tick_due = True
        while not (self.state is NodeState.STOPPING and not self.table.children):
            if tick_due or self.clock() >= next_tick:
                self.tick()
                next_tick = self.clock() + TICK_S
            tick_due = False
            for key, _ in self.selector.select(max(0.0, next_tick - self.clock())):
                key.data()
                # A signal or a control request is acted on at once. A
                # child's log lines are not a reason to tick: a busy worker
                # writes a chunk per batch, and ticking (reading every slot's
                # job table) on each had the master spend a quarter of a core
                # in a drain, the CPU its workers and PostgreSQL share.
                tick_due = tick_due or not self.log_ring.reads_from(key.fd)
        self._shutdown()
        return self.exit_code

    def tick(self) -> None:
        now = self.clock()
        self.reap()
        self.end_orphans()
        self.perform(self.table.watch(now, self._view, self._limits()))
        if self.state is NodeState.RUNNING:
            self._autoscale(now)
        if self.state is not NodeState.STOPPING:
            self.perform(self.table.reconcile(now, self.desired_workers,
                                              api=self.config.api.enabled, busy=self._busy))
            self._finish_reload(now)
        elif self.stop_deadline is not None and now >= self.stop_deadline:
            self._kill_at_stop_deadline(now)
        self.releases.previous_workers_gone(now)
        self.releases.retry(now)
        self._update_drain_state()
        if self.control is not None:
            self.control.tick(now)
        self._publish(now)

    def perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Spawn):
                self.spawn(action.role, action.index)
            elif isinstance(action, Signal):
                self._log_kill(action)
                self.kill(action.pid, action.signum)

    def _autoscale(self, now: float) -> None:
        if self.autoscaler is None or now < self._next_autoscale:
            return
        self._next_autoscale = now + AUTOSCALE_EVERY_S
        load = self._load()
        decision = load and self.autoscaler.decide(now, self.desired_workers, load)
        if decision:
            new, reason = decision
            log.info("autoscaling from %d to %d workers: %s", self.desired_workers, new, reason)
            self.autoscaler.changed(now, time.time(), self.desired_workers, new, reason)
            self.desired_workers = new

    def _load(self) -> Load | None:
        workers = self.table.current_workers()
        running = sum(len(self.board.read(c.slot).running) for c in workers)
        return load_from(read_snapshot(self.config.daemon.state_dir), time.time(), running,
                         len(workers) * self.config.worker.concurrency)

    def _limits(self) -> Limits:
        worker = self.config.worker
        hard = int(worker.max_rss_mb * RSS_HARD_LIMIT_FACTOR * 2**20) if worker.max_rss_mb else 0
        return Limits(worker.heartbeat_timeout, self.config.daemon.stop_timeout, hard)

    def _view(self, child: Child) -> Any:
        return self.board.read(child.slot)

    def _busy(self, child: Child) -> bool:
        return self.board.read(child.slot).state == ChildState.BUSY

    # -- signals --------------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
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

    # -- children: spawn, reap --------------------------------------------------------

    def spawn(self, role: str, index: int) -> Child | None:
        """Fork the place's child. None when the host refuses (no process or
        file descriptor left): the place retries after the crash backoff
        and says why in status; the master and its other children go on."""
        try:
            log_pipe = self.log_ring.pipe()  # the child's stderr, read into the ring
        except OSError as exc:  # EMFILE, ENFILE
            self._spawn_failed(role, index, "cannot open its log pipe", exc)
            return None
        try:
            listener = (self.api_listener.for_child(self.config.api.listen) if role == "api"
                        else None)
        except OSError as exc:  # its dup(): EMFILE
            os.close(log_pipe[0])
            os.close(log_pipe[1])
            self._spawn_failed(role, index, "cannot copy the API's socket", exc)
            return None
        slot = self.table.take_slot()
        self.board.reset(slot, role, index, restarts=self.table.place(role, index).restarts)
        ctx = ChildContext(role=role, index=index, slot=slot, board=self.board,
                           config=self.config, dsn=self.dsn, master_pid=os.getpid(),
                           after_fork=functools.partial(self._close_in_child, log_pipe),
                           listener=listener,
                           instance=self.node.instance if self.node else "")
        try:
            pid = start_child(ctx, ROLE_MAINS[role])
        except BaseException as exc:
            self.board.reset(slot)
            self.table.free_slots.append(slot)
            os.close(log_pipe[0])
            os.close(log_pipe[1])
            if not isinstance(exc, OSError):
                raise
            self._spawn_failed(role, index, "cannot fork", exc)  # EAGAIN, ENOMEM
            return None
        finally:
            if listener is not None:
                listener.close()  # the child's copy; the master keeps its own
        self.log_ring.watch(self.selector, *log_pipe, role, index)
        log.info("started %s %d (pid %d)", role, index, pid)
        return self.table.add(role, index, slot, pid, self.clock())

    def _spawn_failed(self, role: str, index: int, what: str, exc: OSError) -> None:
        error = f"{what}: {exc}{_LIMIT_HINTS.get(exc.errno or 0, '')}"
        delay = self.table.spawn_failed(role, index, self.clock(), error)
        log.error("%s %d: %s; retrying in %.1fs (failure %d in a row)", role, index, error,
                  delay, self.table.place(role, index).failures)

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
            metrics.child_reaped(pid)
            self.child_exited(pid, os.waitstatus_to_exitcode(status))

    def end_orphans(self) -> None:
        """Kill the processes this master adopted (as the subreaper): the
        descendants of a child that died, which nobody supervises. A
        handler's forked child would otherwise outlive its worker, and
        pulsed itself."""
        for pid in live_children(os.getpid()):
            if pid not in self.table.children:
                log.warning("ending process %d: a descendant of a child that is gone", pid)
                self.kill(pid, signal.SIGKILL)

    def child_exited(self, pid: int, code: int) -> None:
        child = self.table.children.get(pid)
        if child is None:
            return  # not ours (e.g. a subprocess)
        view = self.board.read(child.slot)
        self.board.reset(child.slot)
        exit = self.table.exited(pid, code, self.clock())
        assert exit is not None
        if child.role == "worker":
            for release in dead_worker_releases(child, code, [e.job_id for e in view.jobs],
                                                self.node_id,
                                                running=[e.job_id for e in view.running]):
                self.releases.add(release, self.clock())
        if not child.leaving:
            metrics.child_restarted(child.role, metrics.restart_reason(
                code, child.kill_reason.value if child.kill_reason else None))
        how = describe_exit(code)
        if child.kill_reason is KillReason.STOP and child.role == "worker":  # ours, not a crash
            how += " at the stop deadline; its running jobs are recorded interrupted and run again"
        log.log(logging.INFO if exit.expected else logging.WARNING,
                "%s %d (pid %d) %s", child.role, child.index, child.pid, how)
        if exit.expected:
            return
        place = self.table.place(child.role, child.index)
        place.last_error = view.message or how
        if code == CHILD_BOOT_ERROR and child.generation == self.table.generation:
            self.roll_back_reload(child, place.last_error)
        if exit.respawn_in:
            log.warning("%s %d restarts in %.1fs (failure %d in a row): %s", child.role,
                        child.index, exit.respawn_in, place.failures, place.last_error)

    def _log_kill(self, action: Signal) -> None:
        child = self.table.children.get(action.pid)
        if child is not None:
            said = kill_message(child, action.signum, self._limits().rss_hard_limit,
                                self.clock() - self.board.read(child.slot).heartbeat)
            if said:
                log.log(*said)

    # -- status ---------------------------------------------------------------------------

    def node_view(self) -> NodeView:
        return NodeView(self.table, self._view, self.node_id, self.state, self.desired_workers,
                        self.clock() - self.started_at, self.started_wall,
                        self.autoscaler.report() if self.autoscaler else None)

    def report(self) -> StatusReport:
        return build_report(self.node_view(), read_snapshot(self.config.daemon.state_dir),
                            self.clock(), time.time())

    def _status_line(self) -> str:
        return status_line(self.node_view())

    def _publish(self, now: float) -> None:
        line = self._status_line()
        setproctitle(f"pulsed: master [{self.node_id}] {line}")
        if not self._ready_sent and self._workers_up():
            self.notifier.ready(line)
            self._ready_sent = True
            # Now, not before the first fork (start-up): the children forked
            # from here on (a crashed one's successor, a scale-up, a recycled
            # worker) inherit prometheus_client instead of importing it on
            # the way out of their first job (15 ms alone, more in a crowd)
            metrics.prepare()
        else:  # before READY=1 too: a node whose workers cannot boot says so
            self.notifier.status(line)
        self.notifier.tick(now)

    def _workers_up(self) -> bool:
        workers = self.table.current_workers()
        return len(workers) >= self.desired_workers and all(
            self.board.read(c.slot).state != ChildState.STARTING for c in workers)

    def _shutdown(self) -> None:
        self.log_ring.drain()  # the children's last words, before the master's
        self.releases.retry(self.clock(), force=True)
        self.api_listener.close()
        if self.control is not None:
            self.control.close()
        self.selector.close()
        signal.set_wakeup_fd(-1)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        os.close(self._signal_r)
        os.close(self._signal_w)
        log.info("pulsed master stopped")


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
