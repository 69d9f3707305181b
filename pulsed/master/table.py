"""The master's child table: every child's state, and the places they fill.

Pure bookkeeping. Nothing here forks, signals or reads a clock: the time
comes in as `now`, what the board says comes in as views, and every decision
comes out as actions (`Spawn`, `Signal`) for the loop (pulsed/master/loop.py)
to carry out. So each edge of a child's life can be driven by a unit test
with a fake clock, in milliseconds.

A child's life (`Phase`), and the only edges between phases (`EDGES`):

    RUNNING --stop--> STOPPING --stop_overran--> KILLED
    RUNNING/STOPPING/QUITTING --job_overran--> TERMINATING --term_expired--> KILLED
    RUNNING/STOPPING/QUITTING --heartbeat_lost / over_rss--> KILLED
    RUNNING/STOPPING --fast_stop--> QUITTING
    any but KILLED-for-stop --stop_deadline--> KILLED
    any --exited--> (removed from the table; its place remembers)

A place is a (role, index) pair; it outlives its children and carries the
restart count and the crash-loop backoff.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterable

from pulsed.board import SERVING_STATES, ChildState, SlotView
from pulsed.errors import CHILD_BOOT_ERROR, CHILD_RECYCLE

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
STABLE_UPTIME_S = 10.0  # a child that ran this long was not crash-looping
HARD_TIMEOUT_GRACE_S = 2.0  # past a job's timeout before the master steps in
KILL_AFTER_TERM_S = 1.0
# A worker over worker.max_rss_mb recycles after its job; one this many
# times over it is killed mid-job (a job that keeps growing never ends).
RSS_HARD_LIMIT_FACTOR = 1.5


class Phase(Enum):
    RUNNING = "running"
    STOPPING = "stopping"  # asked to stop (TERM): finishes its jobs, up to stop_timeout
    QUITTING = "quitting"  # a fast stop (QUIT): leaves at once
    TERMINATING = "terminating"  # TERM for an overrun job; KILL after KILL_AFTER_TERM_S
    KILLED = "killed"  # KILL sent; waiting to be reaped


class KillReason(str, Enum):
    TIMEOUT = "timeout"  # a job ran past its timeout
    HEARTBEAT = "heartbeat"  # the child went silent
    RSS = "rss"  # over the hard memory limit
    STOP = "stop"  # still running past the stop timeout or deadline


# edge -> (the phases it leaves from, the phase it reaches)
EDGES: dict[str, tuple[frozenset[Phase], Phase]] = {
    "stop": (frozenset({Phase.RUNNING, Phase.STOPPING}), Phase.STOPPING),
    "fast_stop": (frozenset({Phase.RUNNING, Phase.STOPPING}), Phase.QUITTING),
    "job_overran": (frozenset({Phase.RUNNING, Phase.STOPPING, Phase.QUITTING}), Phase.TERMINATING),
    "term_expired": (frozenset({Phase.TERMINATING}), Phase.KILLED),
    "heartbeat_lost": (frozenset({Phase.RUNNING, Phase.STOPPING, Phase.QUITTING}), Phase.KILLED),
    "over_rss": (frozenset({Phase.RUNNING, Phase.STOPPING, Phase.QUITTING}), Phase.KILLED),
    "stop_overran": (frozenset({Phase.STOPPING}), Phase.KILLED),
    "stop_deadline": (frozenset(Phase), Phase.KILLED),
}
EDGE_SIGNAL = {"stop": signal.SIGTERM, "fast_stop": signal.SIGQUIT,
               "job_overran": signal.SIGTERM}  # every other edge sends SIGKILL
EDGE_REASON = {"job_overran": KillReason.TIMEOUT, "heartbeat_lost": KillReason.HEARTBEAT,
               "over_rss": KillReason.RSS, "stop_overran": KillReason.STOP,
               "stop_deadline": KillReason.STOP}


class InvalidEdge(Exception):
    """A transition the table does not allow: a bug in the caller."""


@dataclass(frozen=True)
class Spawn:
    role: str
    index: int


@dataclass(frozen=True)
class Signal:
    pid: int
    signum: int


Action = Spawn | Signal


@dataclass
class Child:
    """A running child as the master tracks it."""

    role: str
    index: int
    slot: int
    pid: int
    generation: int
    started_at: float
    phase: Phase = Phase.RUNNING
    leaving: bool = False  # asked to go (a stop, scale-down, reload, restart): not a crash
    phase_since: float = 0.0
    kill_reason: KillReason | None = None
    timed_out_jobs: tuple[int, ...] = ()  # the jobs whose deadline made us kill it
    rss_killed: int = 0  # the RSS (bytes) that made us kill it

    @property
    def shown_stopping(self) -> bool:
        """Shown as `stopping` in status: on its way out, for any reason."""
        return self.leaving or self.kill_reason is not None


@dataclass
class Place:
    """A (role, index) place and its history across restarts."""

    restarts: int = 0
    failures: int = 0  # consecutive early exits
    respawn_at: float | None = None  # set while waiting to respawn
    last_error: str = ""


@dataclass(frozen=True)
class Exit:
    """What the table concluded from a child's exit."""

    child: Child
    code: int
    expected: bool  # asked for (a stop, a recycle): not a crash
    respawn_in: float | None  # None: no respawn scheduled by this exit


def change_state(child: Child, edge: str, now: float) -> list[Action]:
    """Move `child` along `edge`; return the signal that edge sends."""
    sources, target = EDGES[edge]
    if child.phase not in sources:
        raise InvalidEdge(f"{child.role} {child.index}: no edge {edge!r} from {child.phase.value}")
    if edge == "stop_deadline" and child.kill_reason is KillReason.STOP:
        return []  # already killed for the stop
    if edge in ("stop", "fast_stop"):
        child.leaving = True
    if edge in EDGE_REASON:
        child.kill_reason = EDGE_REASON[edge]
    child.phase = target
    child.phase_since = now
    return [Signal(child.pid, EDGE_SIGNAL.get(edge, signal.SIGKILL))]


def backoff_delay(failures: int) -> float:
    """Seconds before a place's next start after `failures` early exits in a row."""
    return 0.0 if failures <= 0 else min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (failures - 1))


@dataclass
class Limits:
    """The parts of the config the table's decisions read."""

    heartbeat_timeout: float
    stop_timeout: float
    rss_hard_limit: int  # bytes; 0: none


class ChildTable:
    def __init__(self, slots: int) -> None:
        self.children: dict[int, Child] = {}
        self.places: dict[tuple[str, int], Place] = {}
        self.free_slots = list(range(slots - 1, -1, -1))
        self.generation = 0
        self.served: set[tuple[str, int]] = set()  # places whose new child served (a reload)

    # -- entries ------------------------------------------------------------------

    def take_slot(self) -> int:
        return self.free_slots.pop()

    def add(self, role: str, index: int, slot: int, pid: int, now: float) -> Child:
        child = Child(role, index, slot, pid, self.generation, now, phase_since=now)
        self.children[pid] = child
        self.place(role, index).respawn_at = None
        return child

    def place(self, role: str, index: int) -> Place:
        return self.places.setdefault((role, index), Place())

    def exited(self, pid: int, code: int, now: float) -> Exit | None:
        """A child was reaped: free its slot, and schedule its respawn
        (at once after a recycle; after a growing backoff when it died
        early, so a crash loop does not spin)."""
        child = self.children.pop(pid, None)
        if child is None:
            return None  # not ours (a handler's subprocess, say)
        self.free_slots.append(child.slot)
        place = self.place(child.role, child.index)
        expected = child.leaving or code == CHILD_RECYCLE
        if expected:
            place.failures = 0
            recycled = code == CHILD_RECYCLE and child.generation == self.generation
            if recycled:
                place.respawn_at = now
            return Exit(child, code, True, 0.0 if recycled else None)
        early = code == CHILD_BOOT_ERROR or now - child.started_at < STABLE_UPTIME_S
        place.failures = place.failures + 1 if early else 0
        delay = backoff_delay(place.failures)
        place.respawn_at = now + delay
        place.restarts += 1
        return Exit(child, code, False, delay)

    def spawn_failed(self, role: str, index: int, now: float, error: str) -> float:
        """The master could not fork the place's child (the process or file
        limit reached): it waits out the crash backoff, as a child that died
        at once would, so the loop neither dies nor spins. The delay."""
        place = self.place(role, index)
        place.failures += 1
        place.last_error = error
        delay = backoff_delay(place.failures)
        place.respawn_at = now + delay
        return delay

    # -- watching -----------------------------------------------------------------

    def watch(self, now: float, views: Callable[[Child], SlotView], limits: Limits) -> list[Action]:
        """Kill children whose job overran, that went silent or outgrew the
        memory limit, and stopping ones that ignore the stop."""
        actions: list[Action] = []
        for child in list(self.children.values()):
            if child.phase is Phase.TERMINATING:
                if now >= child.phase_since + KILL_AFTER_TERM_S:
                    actions += change_state(child, "term_expired", now)
                continue
            if child.phase is Phase.KILLED:
                continue
            edge = self._trouble(child, views(child), now, limits)
            if edge:
                actions += change_state(child, edge, now)
        return actions

    @staticmethod
    def _trouble(child: Child, view: SlotView, now: float, limits: Limits) -> str | None:
        overdue = tuple(entry.job_id for entry in view.running if entry.deadline is not None
                        and now > entry.deadline + HARD_TIMEOUT_GRACE_S)
        if overdue:
            child.timed_out_jobs = overdue
            return "job_overran"
        if child.role == "worker" and limits.rss_hard_limit and view.rss_bytes > limits.rss_hard_limit:
            child.rss_killed = view.rss_bytes
            return "over_rss"
        if now - view.heartbeat > limits.heartbeat_timeout:
            return "heartbeat_lost"
        if child.phase is Phase.STOPPING and now - child.phase_since > limits.stop_timeout:
            return "stop_overran"
        return None

    # -- reconciling --------------------------------------------------------------

    def reconcile(self, now: float, desired_workers: int, *, api: bool,
                  busy: Callable[[Child], bool]) -> list[Action]:
        """Spawn what is missing, stop what is extra, respawn when due."""
        # Workers first: at start, the first claim does not wait for the
        # scheduler's and the API's forks (nothing of theirs is needed for it).
        actions: list[Action] = []
        workers = self.current_workers()
        waiting = self.waiting_worker_places()
        for index in sorted(waiting, reverse=True):
            if len(workers) + len(waiting) <= desired_workers:
                break
            waiting.pop(index)
            self.places[("worker", index)].respawn_at = None
        for index in waiting:
            actions += self._spawn_if_due("worker", index, now)
        missing = desired_workers - len(workers) - len(waiting)
        actions += [Spawn("worker", index) for index in self._free_worker_indexes(missing)]
        if missing < 0:
            actions += self._stop_extra_workers(-missing, now, busy)
        for role, wanted in (("scheduler", True), ("api", api)):
            if wanted and not any(c.role == role and c.generation == self.generation
                                  for c in self.children.values()):
                actions += self._spawn_if_due(role, 0, now)
        return actions

    def _spawn_if_due(self, role: str, index: int, now: float) -> list[Action]:
        place = self.places.get((role, index))
        if place is not None and place.respawn_at is not None and now < place.respawn_at:
            return []
        return [Spawn(role, index)]

    def current_workers(self) -> list[Child]:
        return [c for c in self.children.values()
                if c.role == "worker" and c.generation == self.generation and not c.leaving]

    def waiting_worker_places(self) -> dict[int, Place]:
        running = {c.index for c in self.current_workers()}
        return {index: place for (role, index), place in self.places.items()
                if role == "worker" and place.respawn_at is not None and index not in running}

    def _free_worker_indexes(self, count: int) -> list[int]:
        taken = {c.index for c in self.current_workers()} | set(self.waiting_worker_places())
        found: list[int] = []
        index = 1
        while len(found) < count:
            if index not in taken:
                found.append(index)
            index += 1
        return found

    def _stop_extra_workers(self, count: int, now: float,
                            busy: Callable[[Child], bool]) -> list[Action]:
        """Scale down: idle workers first, then the busy ones (which finish
        their job before leaving)."""
        ranked = sorted(self.current_workers(), key=lambda c: (busy(c), -c.index))
        return self.stop(ranked[:count], now)

    # -- stopping -----------------------------------------------------------------

    def stop(self, children: Iterable[Child], now: float) -> list[Action]:
        """Ask children to stop. One already on its way out is only marked
        leaving (its exit is then not a crash)."""
        actions: list[Action] = []
        for child in children:
            if child.phase in EDGES["stop"][0]:
                actions += change_state(child, "stop", now)
            else:
                child.leaving = True
        return actions

    def fast_stop(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for child in self.children.values():
            child.leaving = True
            if child.phase in EDGES["fast_stop"][0]:
                actions += change_state(child, "fast_stop", now)
        return actions

    def stop_deadline(self, now: float) -> list[Action]:
        """The node's stop deadline passed: kill whatever is left."""
        actions: list[Action] = []
        for child in self.children.values():
            actions += change_state(child, "stop_deadline", now)
        return actions

    def previous_generations(self) -> list[Child]:
        return [c for c in self.children.values()
                if c.generation < self.generation and not c.leaving]

    def new_generation_up(self, desired_workers: int,
                          state_of: Callable[[Child], ChildState]) -> bool:
        """Every child of the newest generation serves, and as many of its
        workers as are wanted. A worker that failed to boot is no row here
        (it exited; its place waits out its backoff): counting the new
        scheduler and API in its stead handed over to no worker at all."""
        new = [c for c in self.children.values() if c.generation == self.generation]
        # A place counts once its child served: with workers recycling fast
        # (max_jobs), some new one is always starting.
        self.served.update((c.role, c.index) for c in new if state_of(c) in SERVING_STATES)
        workers = sum(1 for role, _ in self.served if role == "worker")
        return (all((c.role, c.index) in self.served for c in new)
                and workers >= desired_workers)

    def begin_generation(self) -> int:
        """A reload: children spawned from now on are of the next generation."""
        self.generation += 1
        self.served = set()
        return self.generation


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by signal {-code} ({signal.Signals(-code).name})"
    names = {0: "exited cleanly", CHILD_BOOT_ERROR: "could not start (boot error)",
             CHILD_RECYCLE: "left to be recycled"}
    return names.get(code, f"exited with status {code}")
