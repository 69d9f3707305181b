"""The master's child table driven through every edge with a fake clock:
nothing forks, nothing is signalled, each test runs in milliseconds."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import pytest

from pulsed.board import ChildState
from pulsed.config import parse_config
from pulsed.errors import CHILD_BOOT_ERROR, CHILD_RECYCLE
from pulsed.master import Master
from pulsed.master.releases import UNSTARTED, dead_worker_releases
from pulsed.master.table import (BACKOFF_CAP_S, HARD_TIMEOUT_GRACE_S, KILL_AFTER_TERM_S,
                                 STABLE_UPTIME_S, Child, ChildTable, InvalidEdge, KillReason,
                                 Limits, Phase, Signal, Spawn, backoff_delay, change_state)
from pulsed.status_report import NodeState

LIMITS = Limits(heartbeat_timeout=30.0, stop_timeout=10.0, rss_hard_limit=300 * 2**20)


@dataclass
class Entry:
    job_id: int
    deadline: float | None = None
    started: float = 0.0


@dataclass
class View:
    """What the table reads of a child's board slot."""

    heartbeat: float = 0.0
    rss_bytes: int = 0
    state: ChildState = ChildState.IDLE
    running: list[Entry] = field(default_factory=list)


class Fleet:
    """A table plus the pids it handed out, as the loop would run it."""

    def __init__(self) -> None:
        self.table = ChildTable(slots=64)
        self.views: dict[int, View] = {}
        self.next_pid = 100

    def carry_out(self, actions, now: float) -> list[Signal]:
        signals = []
        for action in actions:
            if isinstance(action, Spawn):
                self.next_pid += 1
                self.table.add(action.role, action.index, self.table.take_slot(),
                               self.next_pid, now)
                self.views[self.next_pid] = View(heartbeat=now)
            else:
                signals.append(action)
        return signals

    def reconcile(self, now: float, workers: int, api: bool = False) -> list[Signal]:
        return self.carry_out(self.table.reconcile(
            now, workers, api=api, busy=lambda c: self.views[c.pid].state == ChildState.BUSY), now)

    def watch(self, now: float, limits: Limits = LIMITS) -> list[Signal]:
        return self.carry_out(self.table.watch(now, lambda c: self.views[c.pid], limits), now)

    def worker(self, index: int) -> Child:
        return next(c for c in self.table.children.values()
                    if c.role == "worker" and c.index == index)

    def workers(self) -> list[int]:
        return sorted(c.index for c in self.table.current_workers())


def test_reconcile_starts_the_scheduler_the_api_and_the_workers():
    fleet = Fleet()
    fleet.reconcile(0.0, workers=3, api=True)
    roles = sorted((c.role, c.index) for c in fleet.table.children.values())
    assert roles == [("api", 0), ("scheduler", 0), ("worker", 1), ("worker", 2), ("worker", 3)]
    assert fleet.reconcile(0.1, workers=3, api=True) == []  # nothing more to do


def test_at_start_the_workers_fork_first():
    """Start-up is exec to the first claim: the workers' forks do not wait
    behind the scheduler's and the API's (nothing of theirs is needed)."""
    actions = ChildTable(slots=64).reconcile(0.0, 2, api=True, busy=lambda c: False)
    assert [(a.role, a.index) for a in actions] == [
        ("worker", 1), ("worker", 2), ("scheduler", 0), ("api", 0)]


def test_scale_up_takes_the_lowest_free_indexes_and_down_stops_idle_workers_first():
    fleet = Fleet()
    fleet.reconcile(0.0, workers=4)
    fleet.views[fleet.worker(4).pid].state = ChildState.BUSY
    signals = fleet.reconcile(1.0, workers=2)
    stopped = {s.pid for s in signals}
    assert stopped == {fleet.worker(3).pid, fleet.worker(2).pid}  # idle ones, highest first
    assert all(s.signum == signal.SIGTERM for s in signals)
    assert fleet.workers() == [1, 4]
    fleet.reconcile(2.0, workers=4)
    assert fleet.workers() == [1, 2, 3, 4]  # new workers beside the leaving ones


def test_a_crash_loop_backs_off_doubling_up_to_the_cap():
    fleet = Fleet()
    now = 0.0
    fleet.reconcile(now, workers=1)
    delays = []
    for _ in range(9):
        child = fleet.worker(1)
        exit = fleet.table.exited(child.pid, CHILD_BOOT_ERROR, now + 0.05)
        assert exit is not None and not exit.expected
        delays.append(exit.respawn_in)
        now += 0.05
        assert fleet.reconcile(now + exit.respawn_in - 0.01, workers=1) == []
        assert not fleet.table.current_workers(), "respawned before its backoff ended"
        now += exit.respawn_in
        fleet.reconcile(now, workers=1)
        assert fleet.workers() == [1]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_CAP_S, BACKOFF_CAP_S, BACKOFF_CAP_S]
    assert fleet.table.place("worker", 1).restarts == 9


def test_a_child_that_ran_long_enough_resets_the_backoff():
    fleet = Fleet()
    fleet.reconcile(0.0, workers=1)
    for now in (0.1, 0.7, 1.8):
        fleet.table.exited(fleet.worker(1).pid, 1, now)
        fleet.reconcile(now + backoff_delay(fleet.table.place("worker", 1).failures), workers=1)
    assert fleet.table.place("worker", 1).failures == 3
    child = fleet.worker(1)
    exit = fleet.table.exited(child.pid, 1, child.started_at + STABLE_UPTIME_S + 1)
    assert exit.respawn_in == 0.0 and fleet.table.place("worker", 1).failures == 0


def test_a_recycled_worker_is_replaced_at_once_and_not_counted_as_a_crash():
    fleet = Fleet()
    fleet.reconcile(0.0, workers=1)
    exit = fleet.table.exited(fleet.worker(1).pid, CHILD_RECYCLE, 0.1)
    assert exit.expected and exit.respawn_in == 0.0
    fleet.reconcile(0.1, workers=1)
    assert fleet.workers() == [1] and fleet.table.place("worker", 1).restarts == 0


def test_scaling_down_drops_places_waiting_out_a_backoff():
    fleet = Fleet()
    fleet.reconcile(0.0, workers=2)
    fleet.table.exited(fleet.worker(2).pid, 1, 0.1)
    assert 2 in fleet.table.waiting_worker_places()
    assert fleet.reconcile(0.2, workers=1) == []
    assert fleet.table.waiting_worker_places() == {} and fleet.workers() == [1]


def test_a_job_past_its_timeout_gets_term_then_kill():
    fleet = Fleet()
    fleet.reconcile(0.0, workers=1)
    child = fleet.worker(1)
    fleet.views[child.pid].running = [Entry(7, deadline=5.0), Entry(8, deadline=None)]
    assert fleet.watch(5.0 + HARD_TIMEOUT_GRACE_S) == []  # not yet past the grace
    now = 5.0 + HARD_TIMEOUT_GRACE_S + 0.01
    fleet.views[child.pid].heartbeat = now
    assert fleet.watch(now) == [Signal(child.pid, signal.SIGTERM)]
    assert child.phase is Phase.TERMINATING and child.kill_reason is KillReason.TIMEOUT
    assert child.timed_out_jobs == (7,)
    assert fleet.watch(now + KILL_AFTER_TERM_S - 0.01) == []
    assert fleet.watch(now + KILL_AFTER_TERM_S) == [Signal(child.pid, signal.SIGKILL)]
    assert child.phase is Phase.KILLED
    assert fleet.watch(now + 10) == []  # killed once


def test_a_silent_child_and_one_over_the_memory_limit_are_killed_at_once():
    fleet = Fleet()
    fleet.reconcile(0.0, workers=2)
    silent, fat = fleet.worker(1), fleet.worker(2)
    fleet.views[fat.pid].rss_bytes = LIMITS.rss_hard_limit + 1
    fleet.views[silent.pid].heartbeat = -31.0
    fleet.views[fat.pid].heartbeat = 0.0
    assert sorted(fleet.watch(0.0), key=lambda s: s.pid) == [
        Signal(silent.pid, signal.SIGKILL), Signal(fat.pid, signal.SIGKILL)]
    assert silent.kill_reason is KillReason.HEARTBEAT and fat.kill_reason is KillReason.RSS
    assert fat.rss_killed == LIMITS.rss_hard_limit + 1


def test_a_stop_past_stop_timeout_is_killed_and_its_jobs_read_as_interrupted():
    fleet = Fleet()
    fleet.reconcile(0.0, workers=1)
    child = fleet.worker(1)
    assert fleet.carry_out(fleet.table.stop([child], 1.0), 1.0) == [
        Signal(child.pid, signal.SIGTERM)]
    fleet.views[child.pid].heartbeat = 11.0
    assert fleet.watch(11.0) == []
    assert fleet.watch(11.01) == [Signal(child.pid, signal.SIGKILL)]
    assert child.kill_reason is KillReason.STOP
    exit = fleet.table.exited(child.pid, -signal.SIGKILL, 11.2)
    assert exit.expected and exit.respawn_in is None  # asked to go: no crash, no respawn
    outcomes = [r.outcome for r in dead_worker_releases(child, -9, [5], "n1")]
    assert outcomes == [UNSTARTED, "interrupted"]


def test_a_leaving_worker_killed_by_someone_else_died_and_a_fast_stopped_one_was_interrupted():
    child = Child("worker", 2, 0, 4244, 0, 0.0)
    change_state(child, "stop", 1.0)  # a scale-down: TERM, it finishes its job
    assert [r.outcome for r in dead_worker_releases(child, -9, [5], "n1")] == [
        UNSTARTED, "worker_died"]  # not the master's kill: every one of those has a reason
    change_state(child, "fast_stop", 2.0)
    assert [r.outcome for r in dead_worker_releases(child, 0, [5], "n1")] == [
        UNSTARTED, "interrupted"]


def test_a_crash_releases_started_jobs_as_worker_died_and_timeouts_as_timeout():
    child = Child("worker", 3, 0, 4242, 0, 0.0, kill_reason=KillReason.TIMEOUT,
                  timed_out_jobs=(7,), phase=Phase.KILLED)
    releases = dead_worker_releases(child, -9, [7, 8], "n1")
    assert [(r.outcome, r.job_ids) for r in releases] == [
        (UNSTARTED, (7, 8)), ("timeout", (7,)), ("interrupted", None)]
    assert releases[0].owners == ("n1/worker-3/4242",)
    crashed = Child("worker", 3, 0, 4243, 0, 0.0)
    assert [(r.outcome, r.may_poison) for r in dead_worker_releases(crashed, 1, [9], "n1")] == [
        (UNSTARTED, True), ("worker_died", True)]


def test_a_crash_with_several_jobs_running_makes_none_of_them_poison():
    # Any of them may have killed the worker; counted, the culprit's sibling
    # (run beside it again after the same backoff) was failed as poison.
    crashed = Child("worker", 3, 0, 4243, 0, 0.0)
    [_, died] = dead_worker_releases(crashed, -11, [9, 10, 11], "n1", running=[9, 10, 11])
    assert (died.outcome, died.job_ids, died.may_poison) == ("worker_died", None, False)
    # At concurrency 1 the jobs of a batch that finished before it are on the
    # board until their completions are written: only the running one counts.
    [_, died] = dead_worker_releases(crashed, -11, [9, 10, 11], "n1", running=[11])
    assert died.may_poison


def test_a_fast_stop_quits_everyone_and_the_deadline_kills_the_rest():
    fleet = Fleet()
    fleet.reconcile(0.0, workers=2)
    signals = fleet.carry_out(fleet.table.fast_stop(1.0), 1.0)
    assert {s.signum for s in signals} == {signal.SIGQUIT} and len(signals) == 3
    assert all(c.phase is Phase.QUITTING and c.leaving for c in fleet.table.children.values())
    signals = fleet.carry_out(fleet.table.stop_deadline(3.0), 3.0)
    assert {s.signum for s in signals} == {signal.SIGKILL} and len(signals) == 3
    assert fleet.carry_out(fleet.table.stop_deadline(3.5), 3.5) == []  # once


def _reloaded(fleet: Fleet) -> tuple[set[int], list[int]]:
    """Two workers and a scheduler, then a reload: the old pids and the new."""
    fleet.reconcile(0.0, workers=2)
    old = set(fleet.table.children)
    fleet.table.begin_generation()
    fleet.reconcile(1.0, workers=2)
    return old, sorted(set(fleet.table.children) - old)


def _up(fleet: Fleet, workers: int = 2) -> bool:
    return fleet.table.new_generation_up(workers, lambda c: fleet.views[c.pid].state)


def test_a_reload_starts_a_new_generation_then_stops_the_old_one():
    fleet = Fleet()
    old, new = _reloaded(fleet)
    assert len(new) == 3  # a scheduler and two workers beside the old ones
    for pid in new:
        fleet.views[pid].state = ChildState.STARTING
    assert not _up(fleet)
    for pid in new:
        fleet.views[pid].state = ChildState.IDLE
    assert _up(fleet)
    signals = fleet.carry_out(fleet.table.stop(fleet.table.previous_generations(), 2.0), 2.0)
    assert {s.pid for s in signals} == old


def test_a_new_generation_whose_workers_cannot_boot_is_not_up():
    # A reload naming a handler module that does not import: the new workers
    # exit at boot and wait out their backoff, the new scheduler serves. The
    # old workers must stay (they were stopped, and none took jobs).
    fleet = Fleet()
    _, new = _reloaded(fleet)
    for pid in new:
        fleet.views[pid].state = ChildState.IDLE
    for child in [fleet.table.children[pid] for pid in new]:
        if child.role == "worker":
            fleet.views[child.pid].state = ChildState.BOOT_FAILED
            assert not _up(fleet)
            fleet.table.exited(child.pid, CHILD_BOOT_ERROR, 1.5)
    assert {c.role for c in fleet.table.children.values()
            if c.generation == fleet.table.generation} == {"scheduler"}
    assert not _up(fleet)
    assert _up(fleet, workers=0)  # none wanted


def test_a_place_whose_new_child_served_stays_counted_while_it_recycles():
    # max_jobs recycling keeps some new worker starting at any instant: the
    # hand-over must not wait for all of them serving at once
    fleet = Fleet()
    _, new = _reloaded(fleet)
    for pid in new:
        fleet.views[pid].state = ChildState.STARTING
    fleet.views[new[0]].state = ChildState.IDLE
    assert not _up(fleet)
    fleet.views[new[0]].state = ChildState.STARTING  # recycled: its successor starts
    for pid in new[1:]:
        fleet.views[pid].state = ChildState.IDLE
    assert _up(fleet)
    fleet.table.begin_generation()  # the next reload starts counting again
    assert not _up(fleet)


def test_edges_from_the_wrong_phase_are_refused():
    child = Child("worker", 1, 0, 1, 0, 0.0, phase=Phase.KILLED)
    with pytest.raises(InvalidEdge):
        change_state(child, "stop", 1.0)
    with pytest.raises(InvalidEdge):
        change_state(Child("worker", 1, 0, 1, 0, 0.0), "term_expired", 1.0)


@pytest.fixture
def master():
    clock = [100.0]
    sent: list[tuple[int, int]] = []
    master = Master(parse_config({"daemon": {"workers": 1, "stop_timeout": 5}}, env={}),
                    "postgresql:///none", clock=lambda: clock[0],
                    kill=lambda pid, signum: sent.append((pid, signum)))
    master.fake_clock, master.sent = clock, sent
    yield master
    master.selector.close()
    master.board.close()
    os.close(master._signal_r)
    os.close(master._signal_w)


def test_drain_waits_for_running_jobs_then_reads_drained(master):
    slot = master.table.take_slot()
    master.board.reset(slot, "worker", 1)
    writer = master.board.writer(slot)  # the worker's own writer: it knows its rows
    writer.job_started(9, "email", 100.0, None)
    master.table.add("worker", 1, slot, 4321, 100.0)
    assert master.drain() == {"state": "draining"} and master.board.draining
    master._update_drain_state()
    assert master.state is NodeState.DRAINING
    writer.job_finished(9, 1)
    master._update_drain_state()
    assert master.state is NodeState.DRAINED
    assert master.resume() == {"state": "running"} and not master.board.draining


def test_a_graceful_stop_terms_every_child_and_kills_them_at_the_deadline(master):
    slot = master.table.take_slot()
    master.board.reset(slot, "worker", 1)
    master.table.add("worker", 1, slot, 4321, 100.0)
    assert master.stop() == {"state": "stopping"}
    assert master.sent == [(4321, signal.SIGTERM)]
    master.fake_clock[0] = 105.0
    master._kill_at_stop_deadline(master.clock())
    assert master.sent[-1] == (4321, signal.SIGKILL)
