"""The job ledger: every job a worker holds, through named states.

A hypothesis state machine drives the ledger through claims, starts,
finishes, batch writes that succeed or fail (a lost connection), give-backs,
renewals and the death of the process, and checks after every step that no
job is both given back and written, none is forgotten, and the status board
lists exactly the started, unwritten jobs (what the master accounts for when
the process dies).
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pulsed.board import Board
from pulsed.jobs import RUNNING, Job
from pulsed.worker_completions import _current_report
from pulsed.ledger import Held, JobLedger, LedgerError

EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)


def job(job_id: int) -> Job:
    return Job(job_id, "t", "default", {}, 0, 1, 20, None, EPOCH)


class FakeBoard:
    """The board as the master reads it: started, unwritten jobs."""

    def __init__(self) -> None:
        self.listed: dict[int, bool] = {}  # job id -> running
        self.done = 0

    def job_started(self, job: Job, deadline: float | None) -> None:
        assert job.id not in self.listed, f"job {job.id} started twice"
        self.listed[job.id] = True

    def job_finished(self, job: Job, jobs_done: int) -> None:
        self.listed[job.id] = False
        self.done = jobs_done

    def jobs_cleared(self, jobs: list[Job]) -> None:
        for cleared in jobs:
            self.listed.pop(cleared.id)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.board = FakeBoard()
        self.ledger = JobLedger(self.board, clock=self.clock)
        self.next_id = 1
        self.claimed: set[int] = set()
        self.written: set[int] = set()
        self.given_back: set[int] = set()
        self.failed_by_runner: set[int] = set()
        self.in_flight: list[Job] = []  # a batch on its way to the database

    def _in(self, state: Held) -> list[Job]:
        return [job(i) for i in sorted(self.claimed)
                if self.ledger.state_of(job(i)) is state]

    @rule(count=st.integers(1, 4))
    def claim(self, count: int) -> None:
        jobs = [job(self.next_id + k) for k in range(count)]
        self.next_id += count
        self.ledger.claimed(jobs)
        self.claimed |= {j.id for j in jobs}

    @rule(data=st.data(), timeout=st.sampled_from([None, 5.0]))
    def start(self, data: st.DataObject, timeout: float | None) -> None:
        ids = sorted(self.claimed)
        if not ids:
            return
        chosen = job(data.draw(st.sampled_from(ids)))
        was = self.ledger.state_of(chosen)
        assert self.ledger.start(chosen, timeout) == (was is Held.PREFETCHED)

    @rule(data=st.data(), completed=st.booleans())
    def finish(self, data: st.DataObject, completed: bool) -> None:
        running = self._in(Held.RUNNING)
        if not running:
            return
        chosen = data.draw(st.sampled_from(running))
        self.ledger.finish(chosen, completed=completed)
        if not completed:  # the runner wrote its failure itself
            self.written.add(chosen.id)
            self.failed_by_runner.add(chosen.id)

    @precondition(lambda self: not self.in_flight)
    @rule()
    def send_batch(self) -> None:
        self.in_flight = self.ledger.take_finished()

    @precondition(lambda self: bool(self.in_flight))
    @rule(reached_the_database=st.booleans())
    def batch_returns(self, reached_the_database: bool) -> None:
        batch, self.in_flight = self.in_flight, []
        if reached_the_database:
            self.ledger.written(batch)
            self.written |= {j.id for j in batch}
        else:  # a lost connection: sent again with the next batch
            self.ledger.write_failed(batch)

    @rule(seconds=st.sampled_from([0.1, 0.6, 2.0]), wait=st.booleans())
    def give_back(self, seconds: float, wait: bool) -> None:
        self.clock.now += seconds
        taken = self.ledger.take_unstarted(held_over=1.0 if wait else None)
        self.given_back |= {j.id for j in taken}

    @rule()
    def renew(self) -> None:
        self.clock.now += 3.0
        due = self.ledger.due_for_renewal(1.0)
        held = {j.id for j in due[::2]}  # some leases were taken away
        lost = self.ledger.renewed(due, held)
        assert {j.id for j in lost} == {j.id for j in due} - held
        assert not {j.id for j in self.ledger.due_for_renewal(1.0)} & {j.id for j in lost}

    @rule()
    def process_dies(self) -> None:
        """What the master does: the board's jobs get an attempt, every
        other held job goes back untouched. Checked, then a new process."""
        started = set(self.board.listed)
        held = {i for i in self.claimed if self.ledger.state_of(job(i)) is not None}
        unstarted = {i for i in held if self.ledger.state_of(job(i)) is Held.PREFETCHED}
        assert started == held - unstarted
        assert not started & self.given_back and not started & self.written
        self.claimed -= held  # accounted for by the master
        self.board = FakeBoard()
        self.ledger = JobLedger(self.board, clock=self.clock)
        self.in_flight = []

    @invariant()
    def never_both_given_back_and_written(self) -> None:
        assert not self.given_back & self.written

    @invariant()
    def none_forgotten(self) -> None:
        for job_id in self.claimed:
            held = self.ledger.state_of(job(job_id)) is not None
            ends = [held, job_id in self.written, job_id in self.given_back]
            assert sum(ends) == 1, (job_id, ends)

    @invariant()
    def the_board_lists_exactly_the_started_unwritten_jobs(self) -> None:
        started = {i for i in self.claimed if self.ledger.state_of(job(i)) in (
            Held.RUNNING, Held.FINISHED, Held.WRITING)}
        assert set(self.board.listed) == started
        running = {i for i, is_running in self.board.listed.items() if is_running}
        assert running == {j.id for j in self.ledger.running()}


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_edges_the_ledger_refuses() -> None:
    ledger = JobLedger()
    one = job(1)
    ledger.claimed([one])
    with pytest.raises(LedgerError):
        ledger.claimed([one])
    with pytest.raises(LedgerError):
        ledger.finish(one, completed=True)  # never started
    assert ledger.start(one) and not ledger.start(one)
    with pytest.raises(LedgerError):
        ledger.written([one])  # not in a batch
    assert ledger.take_unstarted() == []


def test_progress_is_due_only_from_the_attempt_that_runs() -> None:
    """A thread left behind by a failed attempt reported after it ended;
    the report was written during (and into) the job's next attempt."""
    ledger = JobLedger()
    earlier, current = job(1), job(1)
    object.__setattr__(earlier, "lease_token", "attempt-1")
    object.__setattr__(current, "lease_token", "attempt-2")
    ledger.claimed([current])
    ledger.start(current)
    try:
        earlier.progress(0.99, "stale")
        assert ledger.progress_due() == []
        current.progress(0.5, "now")
        assert ledger.progress_due() == [current]
        earlier.progress(0.99, "stale again")  # after progress_due, before the write
        assert _current_report(current) is None
    finally:
        RUNNING.forget(1)


def test_prefetched_jobs_go_back_only_once_the_oldest_waited_long_enough() -> None:
    clock = Clock()
    ledger = JobLedger(clock=clock)
    ledger.claimed([job(1), job(2)])
    clock.now += 0.5
    assert ledger.take_unstarted(held_over=1.0) == []
    clock.now += 0.6
    assert [j.id for j in ledger.take_unstarted(held_over=1.0)] == [1, 2]
    assert len(ledger) == 0


def test_a_ledger_drives_a_real_board_slot() -> None:
    board = Board(slots=1)
    board.reset(0, "worker", 1)

    class Slot:
        writer = board.writer(0)

        def job_started(self, j: Job, deadline: float | None) -> None:
            self.writer.job_started(j.id, j.type, 1.0, deadline)

        def job_finished(self, j: Job, jobs_done: int) -> None:
            self.writer.job_finished(j.id, jobs_done)

        def jobs_cleared(self, jobs: list[Job]) -> None:
            self.writer.jobs_cleared([j.id for j in jobs])

    ledger = JobLedger(Slot())
    ledger.claimed([job(1), job(2), job(3)])
    ledger.start(job(1), 5.0)
    ledger.start(job(2))
    ledger.finish(job(1), completed=True)
    view = board.read(0)
    assert [(e.job_id, e.running) for e in view.jobs] == [(1, False), (2, True)]
    batch = ledger.take_finished()
    ledger.written(batch)
    assert [e.job_id for e in board.read(0).jobs] == [2]
    assert board.read(0).jobs_done == 1


def test_a_reserve_refilled_over_time_gives_back_only_the_jobs_held_too_long() -> None:
    """At concurrency > 1 the reserve is topped up claim by claim: a job
    claimed just now is not given back with one that waited a second."""
    clock = Clock()
    ledger = JobLedger(clock=clock)
    ledger.claimed([job(1)])
    clock.now += 0.9
    ledger.claimed([job(2)])
    clock.now += 0.2
    assert [j.id for j in ledger.take_unstarted(held_over=1.0)] == [1]
    assert [j.id for j in ledger.prefetched(5)] == [2]
