"""What an operator can ask of the master, by signal or over the control
socket (pulsed/control/server.py calls these; each returns the dict merged
into the reply). A mix-in of `Master` (pulsed/master/loop.py): the commands
change the master's intent (desired workers, node state, generation); the
loop's next tick carries it out."""

from __future__ import annotations

import dataclasses
import logging
import signal
from typing import TYPE_CHECKING, Any

from pulsed.config import load_config
from pulsed.control.protocol import INVALID_ARGUMENT, ControlError, resolve_workers
from pulsed.errors import ConfigError, PulseError
from pulsed.master.autoscale import make_autoscaler
from pulsed.status_report import NodeState, StatusReport

if TYPE_CHECKING:
    from pulsed.config import Config
    from pulsed.master.loop import Master
    from pulsed.master.table import Child




log = logging.getLogger(__name__)

# [daemon] settings the running master holds: its node claim and the lease
# owner names it releases when a worker dies (node_id), its state dir and
# control socket (which children read and ask). A reload handing new values
# to the new children alone split the node in two.
RESTART_ONLY = ("node_id", "state_dir", "socket", "socket_group")
FAST_STOP_KILL_S = 2.0  # a fast stop kills what has not left by then
RELOAD_HANDOVER_S = 15.0  # a reload whose new generation is not up by then is logged


class Commands:
    def handle_signal(self: Master, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # the tick reaps
        if signum == signal.SIGINT and self.state is NodeState.STOPPING:
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
        elif signum in (signal.SIGTTIN, signal.SIGTTOU):
            step = "+1" if signum == signal.SIGTTIN else "-1"
            try:
                self.scale(step)
            except PulseError as exc:
                log.warning("ignored %s: %s", signal.Signals(signum).name, exc)

    def status(self: Master) -> StatusReport:
        return self.report()

    def scale(self: Master, workers: int | str) -> dict[str, Any]:
        """Set the count; with autoscaling on, pin it there until "auto"."""
        autoscaler = self.autoscaler
        if isinstance(workers, str) and workers.strip() == "auto":
            if autoscaler is None:
                raise ControlError(INVALID_ARGUMENT, "workers=auto needs daemon.workers set "
                                                     "to a range 'MIN..MAX' in the config")
            autoscaler.pinned = None
            log.info("autoscaling again between %d and %d workers", autoscaler.low,
                     autoscaler.high)
            return {"workers": self.desired_workers, "autoscale": autoscaler.report()}
        self.desired_workers = resolve_workers(workers, self.desired_workers)
        if autoscaler is not None:
            autoscaler.pinned = self.desired_workers
            log.info("scaling to %d workers (pinned: `pulsectl scale workers=auto` resumes "
                     "autoscaling)", self.desired_workers)
            return {"workers": self.desired_workers, "autoscale": autoscaler.report()}
        log.info("scaling to %d workers", self.desired_workers)
        return {"workers": self.desired_workers}

    def restart(self: Master, role: str, index: int) -> dict[str, Any]:
        """Replace one child gracefully: it stops as in a scale-down (its
        jobs finish, up to stop_timeout), and reconcile() starts its
        successor (a worker's at once, beside it; the scheduler's and the
        API's once it has left). Asked for: not a crash, not counted as one."""
        child = next((c for c in self.table.children.values() if c.role == role
                      and c.index == index and c.generation == self.table.generation
                      and not c.leaving), None)
        if child is None:
            raise ControlError(INVALID_ARGUMENT, f"no running {role} {index} on this node")
        log.info("restarting %s %d (pid %d) as asked", role, index, child.pid)
        self.perform(self.table.stop([child], self.clock()))
        return {"role": role, "index": index, "pid": child.pid}

    def logs(self: Master, role: str | None, index: int | None, lines: int,
             after: int | None) -> dict[str, Any]:
        found = self.log_ring.tail(role=role, index=index, lines=lines, after=after)
        return {"lines": [line._asdict() for line in found], "last_seq": self.log_ring.last_seq}

    def drain(self: Master) -> dict[str, Any]:
        if self.state is NodeState.RUNNING:
            self.state = NodeState.DRAINING
            log.info("draining: claiming nothing new")
        self.board.draining = True
        self._update_drain_state()
        return {"state": self.state.value}

    def resume(self: Master) -> dict[str, Any]:
        self.board.draining = False
        if self.state in (NodeState.DRAINING, NodeState.DRAINED):
            self.state = NodeState.RUNNING
            log.info("resumed")
        return {"state": self.state.value}

    def reload(self: Master) -> dict[str, Any]:
        if self.state is NodeState.STOPPING:
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
        new = _keep_restart_only(self.config, new)
        self.reload_from = self.config
        self._start_generation(new)
        log.info("reloading: starting generation %d", self.table.generation)
        return {"reloaded": True, "generation": self.table.generation}

    def _start_generation(self: Master, new: Config) -> None:
        """Children spawned from now on run `new`; the running ones leave once
        they are up (_finish_reload)."""
        if (new.daemon.workers, new.daemon.autoscale) != (self.config.daemon.workers,
                                                            self.config.daemon.autoscale):
            self.desired_workers = new.daemon.workers
            self.autoscaler = make_autoscaler(new)
        if not new.api.enabled:
            self.api_listener.close()  # else the kernel would queue connections nobody takes
        self.config = new
        self.table.begin_generation()
        self.reload_started = self.clock()
        self.reload_stalled = False

    def roll_back_reload(self: Master, child: Child, why: str) -> None:
        """A child of the reload's generation could not start (a handler
        module that does not import, say): go back to the config before it,
        as one more generation, while the old children keep running. Once:
        if the old config's children cannot start either, the reload stays
        stalled (logged by _finish_reload)."""
        previous, self.reload_from = self.reload_from, None
        if previous is None or self.reload_started is None:
            return
        log.error("reload: %s %d of generation %d could not start (%s); going back to the "
                  "config before the reload, as generation %d. Fix the config "
                  "(pulsed --check-config) and reload again", child.role, child.index,
                  self.table.generation, why, self.table.generation + 1)
        self.notifier.status(f"reload rolled back: {child.role} {child.index} could not start")
        self._start_generation(previous)

    def stop(self: Master, now: bool = False) -> dict[str, Any]:
        if self.state is NodeState.STOPPING:
            if now and not self.fast_stop:
                self._begin_fast_stop()
            return {"state": NodeState.STOPPING.value}
        self.state = NodeState.STOPPING
        self.notifier.stopping()
        self.api_listener.close()  # new connections are refused, not left waiting
        if now:
            self._begin_fast_stop()
        else:
            log.info("stopping: running jobs get %.0fs to finish", self.config.daemon.stop_timeout)
            self.stop_deadline = self.clock() + self.config.daemon.stop_timeout
            self.perform(self.table.stop(list(self.table.children.values()), self.clock()))
        return {"state": NodeState.STOPPING.value}

    def is_stopping(self: Master) -> bool:
        return self.state is NodeState.STOPPING

    # -- stopping and reloading ---------------------------------------------------------

    def _finish_reload(self: Master, now: float) -> None:
        """Old children leave once the new generation is up, never before: a
        new worker that cannot start (a handler module that does not import)
        would leave none. The first such wait past RELOAD_HANDOVER_S says so."""
        if self.reload_started is None:
            return
        if not self.table.new_generation_up(self.desired_workers,
                                            lambda c: self._view(c).state):
            if now - self.reload_started >= RELOAD_HANDOVER_S and not self.reload_stalled:
                self.reload_stalled = True
                log.error("reload: generation %d is not up after %.0fs (see its children's "
                          "errors above); the children before it keep running until it is. "
                          "Fix the config (pulsed --check-config) and reload again",
                          self.table.generation, RELOAD_HANDOVER_S)
                self.notifier.status(f"reload stalled: generation {self.table.generation} "
                                     f"is not up")
            return
        self.reload_stalled = False
        self.reload_from = None
        self.perform(self.table.stop(self.table.previous_generations(), now))
        self.reload_started = None
        self.notifier.send(READY=1, STATUS=self._status_line())

    def _begin_fast_stop(self: Master) -> None:
        log.info("fast stop")
        self.fast_stop = True
        self.stop_deadline = self.clock() + FAST_STOP_KILL_S
        self.perform(self.table.fast_stop(self.clock()))

    def _kill_at_stop_deadline(self: Master, now: float) -> None:
        self.perform(self.table.stop_deadline(now))

    def _update_drain_state(self: Master) -> None:
        if self.state is NodeState.DRAINING and self.running_jobs() == 0:
            self.state = NodeState.DRAINED
            log.info("drained: no job runs on this node")
        elif self.state is NodeState.DRAINED and self.running_jobs() > 0:
            self.state = NodeState.DRAINING

    def running_jobs(self: Master) -> int:
        return sum(len(self.board.read(c.slot).running) for c in self.table.children.values()
                   if c.role == "worker")


def _keep_restart_only(running: Config, new: Config) -> Config:
    """`new`, with the running RESTART_ONLY settings (each change logged)."""
    changed = {name: getattr(running.daemon, name) for name in RESTART_ONLY
               if getattr(new.daemon, name) != getattr(running.daemon, name)}
    for name in changed:
        log.warning("daemon.%s changed; it takes effect on restart, not reload", name)
    if not changed:
        return new
    return dataclasses.replace(new, daemon=dataclasses.replace(new.daemon, **changed))
