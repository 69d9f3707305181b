"""The job ledger: every job a worker process holds, through named states.

One ledger per worker process. The claim loop, the job runners (inline,
threads, asyncio), the lease keeper and the completion batches all read
and change it, and nothing else keeps its own list of jobs. Each job moves
along these edges only:

    claimed ──> PREFETCHED ──start──> RUNNING ──finish(completed)──> FINISHED
                    │                    │                              │  ^
                    │                    └─finish(failed: its outcome   take_finished  write_failed
                    │                      was written by the runner)   v  │
                    └─take_unstarted──> (given back)        gone <──written── WRITING

- PREFETCHED: leased by the claim (its attempt counted), not started. The
  keeper gives it back if it waits too long; a stop gives it back.
- RUNNING: its handler runs. Listed on the status board with its deadline,
  so the master can account for it if the process dies.
- FINISHED: the handler returned and its completion waits for the next
  batch (sent with the next claim, or by the keeper if that is late).
- WRITING: a batch carrying its completion is on the way to the database.
  If the write fails the job is FINISHED again and goes with the next one.
- gone: its outcome is in the database (written) or it was given back.

Every held job (any state) keeps its lease: the keeper renews from here.
A job is never both given back and written: given back is only reachable
from PREFETCHED, written only from WRITING or RUNNING.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from pulsed.jobs import RUNNING, Job


class Held(enum.Enum):
    PREFETCHED = "prefetched"
    RUNNING = "running"
    FINISHED = "finished"
    WRITING = "writing"


class LedgerError(RuntimeError):
    """A transition the ledger does not allow (a bug in the caller)."""


class JobBoard(Protocol):
    """Where the ledger reports started jobs (the worker's board slot)."""

    def job_started(self, job: Job, deadline: float | None) -> None: ...
    def job_finished(self, job: Job, jobs_done: int) -> None: ...
    def jobs_cleared(self, jobs: list[Job]) -> None: ...
    def job_deadline(self, job: Job, deadline: float) -> None: ...


class NoBoard:
    """A ledger without a status board (run_worker, tests)."""

    def job_started(self, job: Job, deadline: float | None) -> None:
        pass

    def job_finished(self, job: Job, jobs_done: int) -> None:
        pass

    def jobs_cleared(self, jobs: list[Job]) -> None:
        pass

    def job_deadline(self, job: Job, deadline: float) -> None:
        pass


@dataclass
class Entry:
    job: Job
    state: Held
    leased_at: float  # when the lease was last set (claim or renewal), monotonic
    claimed_at: float = 0.0
    finished_at: float = 0.0
    result: str | None = None  # the handler's return value as JSON text, to be written
    lease_lost: bool = False
    cancel_by: float | None = None  # cancelled: stop its handler after this  # a renewal found it taken: stop renewing


class JobLedger:
    def __init__(self, board: JobBoard | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.board = board or NoBoard()
        self.clock = clock
        self.jobs_done = 0
        self._entries: dict[int, Entry] = {}  # in claim order
        self._oldest_finished: float | None = None
        self._lock = threading.Lock()

    # -- edges ----------------------------------------------------------------------

    def claimed(self, jobs: Iterable[Job]) -> None:
        now = self.clock()
        with self._lock:
            for job in jobs:
                if job.id in self._entries:
                    raise LedgerError(f"job {job.id} claimed while already held")
                self._entries[job.id] = Entry(job, Held.PREFETCHED, now, now)

    def start(self, job: Job, timeout: float | None = None) -> bool:
        """PREFETCHED -> RUNNING; False if it was given back meanwhile."""
        now = self.clock()
        with self._lock:
            entry = self._entries.get(job.id)
            if entry is None or entry.state is not Held.PREFETCHED:
                return False
            if entry.cancel_by is not None:  # cancelled before it started: never run it
                del self._entries[job.id]
                RUNNING.forget(job.id)
                return False
            entry.state = Held.RUNNING
        # Before the handler runs: if the process dies in it, the master
        # records the attempt for this job (and kills it past its deadline).
        self.board.job_started(job, now + timeout if timeout else None)
        return True

    def finish(self, job: Job, *, completed: bool, result: str | None = None) -> None:
        """RUNNING -> FINISHED (its completion is to be written), or gone
        when the runner already wrote its outcome (failure, snooze)."""
        now = self.clock()
        with self._lock:
            entry = self._require(job, Held.RUNNING)
            self.jobs_done += 1
            done = self.jobs_done
            if completed:
                entry.state = Held.FINISHED
                entry.finished_at = now
                entry.result = result
                if self._oldest_finished is None:
                    self._oldest_finished = now
            else:
                del self._entries[job.id]
                RUNNING.forget(job.id)
        if completed:
            self.board.job_finished(job, done)
        else:
            self.board.job_finished(job, done)
            self.board.jobs_cleared([job])

    def take_finished(self) -> list[Job]:
        """FINISHED -> WRITING: the completions a batch will carry."""
        with self._lock:
            jobs = [e.job for e in self._entries.values() if e.state is Held.FINISHED]
            for job in jobs:
                self._entries[job.id].state = Held.WRITING
            self._oldest_finished = None
            return jobs

    def results(self, jobs: list[Job]) -> list[str | None]:
        """The results a batch of WRITING jobs carries, in its order."""
        with self._lock:
            return [self._require(job, Held.WRITING).result for job in jobs]

    def written(self, jobs: list[Job]) -> None:
        """WRITING -> gone: the batch committed (whether each lease still
        held or not, the database has the final word on these jobs)."""
        entries, writing = self._entries, Held.WRITING
        with self._lock:
            for job in jobs:
                entry = entries.get(job.id)
                if entry is None or entry.state is not writing:
                    self._require(job, writing)  # raises, saying what it found
                del entries[job.id]
            if RUNNING.cancelled or RUNNING.progress:  # nearly always both empty
                for job in jobs:
                    RUNNING.forget(job.id)
        self.board.jobs_cleared(jobs)

    def write_failed(self, jobs: list[Job]) -> None:
        """WRITING -> FINISHED: the batch did not reach the database."""
        now = self.clock()
        with self._lock:
            for job in jobs:
                self._require(job, Held.WRITING).state = Held.FINISHED
            if jobs and self._oldest_finished is None:
                self._oldest_finished = now

    def take_unstarted(self, *, held_over: float | None = None) -> list[Job]:
        """PREFETCHED -> gone, to be given back: all of them, or (held_over)
        those claimed at least that long ago."""
        now = self.clock()
        with self._lock:
            unstarted = [e.job for e in self._entries.values() if e.state is Held.PREFETCHED
                         and (held_over is None or now - e.claimed_at >= held_over)]
            for job in unstarted:
                del self._entries[job.id]
                RUNNING.forget(job.id)
            return unstarted

    def prefetched(self, limit: int) -> list[Job]:
        """Up to `limit` PREFETCHED jobs, in claim order (the next to start)."""
        found: list[Job] = []
        with self._lock:
            for entry in self._entries.values():
                if len(found) >= limit:
                    break
                if entry.state is Held.PREFETCHED:
                    found.append(entry.job)
        return found

    def cancelled(self, job_id: int, grace: float) -> Job | None:
        """Someone cancelled this job (its row is `cancelled`, its lease
        gone): job.cancelled turns true, and a running handler has `grace`
        seconds before it is stopped. The job, if this process holds it."""
        now = self.clock()
        with self._lock:
            entry = self._entries.get(job_id)
            if entry is None or entry.cancel_by is not None:
                return None
            entry.cancel_by = now + grace
            RUNNING.cancelled.add(job_id)
            running = entry.state is Held.RUNNING
        if running:  # past this the master stops the process, as for a timeout
            self.board.job_deadline(entry.job, now + grace)
        return entry.job

    def cancelled_overdue(self) -> list[Job]:
        """Running jobs whose cancel grace has passed."""
        now = self.clock()
        with self._lock:
            return [e.job for e in self._entries.values() if e.state is Held.RUNNING
                    and e.cancel_by is not None and now >= e.cancel_by]

    def progress_due(self) -> list[Job]:
        """Held running jobs with a progress report not yet written, made
        by their current attempt."""
        pending = RUNNING.progress
        if not pending:
            return []
        with self._lock:
            return [e.job for job_id, (lease, _) in list(pending.items())
                    if (e := self._entries.get(job_id)) is not None and e.state is Held.RUNNING
                    and e.job.lease_token == lease]

    # -- leases ---------------------------------------------------------------------

    def due_for_renewal(self, older_than: float) -> list[Job]:
        """Held jobs whose lease was last set more than older_than ago."""
        cutoff = self.clock() - older_than
        with self._lock:
            return [e.job for e in self._entries.values()
                    if e.leased_at <= cutoff and not e.lease_lost]

    def renewed(self, jobs: list[Job], held: set[int]) -> list[Job]:
        """Record a renewal; returns the jobs whose lease was lost."""
        now = self.clock()
        lost = []
        with self._lock:
            for job in jobs:
                entry = self._entries.get(job.id)
                if entry is None:
                    continue
                if job.id in held:
                    entry.leased_at = now
                else:
                    entry.lease_lost = True
                    lost.append(job)
        return lost

    # -- reading --------------------------------------------------------------------

    def state_of(self, job: Job) -> Held | None:
        with self._lock:
            entry = self._entries.get(job.id)
            return entry.state if entry else None

    def count(self, state: Held) -> int:
        with self._lock:
            return sum(1 for e in self._entries.values() if e.state is state)

    def unwritten_ids(self) -> set[int]:
        """Jobs whose handler returned and whose completion is not written
        yet (FINISHED or WRITING)."""
        with self._lock:
            return {job_id for job_id, e in self._entries.items()
                    if e.state is Held.FINISHED or e.state is Held.WRITING}

    def held_ids(self) -> list[int]:
        """Every job this process holds, in any state."""
        with self._lock:
            return list(self._entries)

    def running(self) -> list[Job]:
        with self._lock:
            return [e.job for e in self._entries.values() if e.state is Held.RUNNING]

    def finished_for(self) -> float:
        """How long the oldest unwritten completion has waited (0: none).
        One attribute read, no lock: asked after every job."""
        oldest = self._oldest_finished
        return 0.0 if oldest is None else self.clock() - oldest

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _require(self, job: Job, state: Held) -> Entry:
        entry = self._entries.get(job.id)
        if entry is None or entry.state is not state:
            found = entry.state.value if entry else "not held"
            raise LedgerError(f"job {job.id}: expected {state.value}, found {found}")
        return entry
