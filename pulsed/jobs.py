"""The job model: its states, and the Job a handler receives.

Each state says who moves a job out of it; every move is one SQL statement
(see pulsed/db/queries.sql), so no job is ever half-moved.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping


class JobState(str, enum.Enum):
    SCHEDULED = "scheduled"
    """run_at is in the future. The leader's promoter moves it to available
    when due; cancel moves it to cancelled."""

    AVAILABLE = "available"
    """Ready to run. A worker's claim moves it to running; cancel to cancelled."""

    RUNNING = "running"
    """Leased by one worker (owner, token, expiry). Only the lease holder moves
    it on (completed, retryable, failed, scheduled on snooze); otherwise the
    master (its worker died), the leader's reaper (the lease expired) or
    cancel."""

    RETRYABLE = "retryable"
    """An attempt failed and attempts remain; run_at is when to retry. The
    promoter moves it to available when due."""

    COMPLETED = "completed"
    """Finished. Final; pruned after its retention. `retry` can rerun it."""

    FAILED = "failed"
    """Attempts exhausted or a non-retryable error; kept for inspection.
    `retry` moves it back to available."""

    CANCELLED = "cancelled"
    """Cancelled by an operator. Final; `retry` moves it back to available."""

    @property
    def is_finished(self) -> bool:
        return self in FINISHED_STATES


FINISHED_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})

# What an operator's cancel and retry accept (Store.cancel and Store.retry;
# queries.sql's job_cancel and job_retry say the same, and
# tests/unit/test_state_lists.py pins that they agree). In the order error
# messages list them.
CANCELLABLE_STATES = tuple(state.value for state in JobState if not state.is_finished)
"""Every state but a finished one: scheduled, available, running, retryable."""
RETRYABLE_STATES = (JobState.COMPLETED.value, JobState.FAILED.value, JobState.CANCELLED.value,
                    JobState.RETRYABLE.value, JobState.SCHEDULED.value)
"""A finished job, or one waiting for its time (run now): not one available
or running already."""


# Retry backoff, the same for every way an attempt can fail (an error, a
# timeout, a dead worker, an expired lease): ~2 s, 4 s, 8 s, ... capped at an
# hour, +-25% so jobs that failed together retry apart. The worker computes
# it in Python, the master and the reaper in SQL from these same numbers.
BACKOFF_BASE_S = 2.0
BACKOFF_CAP_S = 3600.0
BACKOFF_JITTER = 0.25
# That many worker_died or timeout attempts in a row fail a job at once.
DEFAULT_POISON_AFTER = 3
# Attempts a job gets when neither its enqueue, its handler nor [types]
# says: the claim passes it to SQL (the only place it is applied).
DEFAULT_MAX_ATTEMPTS = 20


def backoff_params(poison_after: int = DEFAULT_POISON_AFTER) -> dict[str, float | int]:
    """The SQL parameters of the backoff and poison rules."""
    return {"backoff_base": BACKOFF_BASE_S, "backoff_cap": BACKOFF_CAP_S,
            "backoff_jitter": BACKOFF_JITTER, "poison_after": poison_after}


class Outcome(str, enum.Enum):
    """How one attempt ended (the `outcome` of an attempt row)."""

    COMPLETED = "completed"
    ERROR = "error"
    TIMEOUT = "timeout"
    WORKER_DIED = "worker_died"
    LEASE_EXPIRED = "lease_expired"
    SNOOZED = "snoozed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    """Stopped by an operator's stop or recycle past its timeout, or by the
    hard kill of a sibling job in the same process: recorded, and the
    attempt is given back (it was not the job's fault)."""


class Unreadable(str):
    """A stored value Python cannot represent, kept as PostgreSQL's text of
    it so the job can still be shown: a timestamp before year 1 or after
    9999 (or infinity) written by SQL directly or by an older Pulse, say.
    `column` names it; `reason` is the loader's error."""

    column: str
    reason: str

    def __new__(cls, text: str, *, column: str, reason: str) -> Unreadable:
        value = super().__new__(cls, text)
        value.column = column
        value.reason = reason
        return value

    def describe(self, limit: int = 200) -> str:
        text = str(self) if len(self) <= limit else f"{str(self)[:limit]}..."
        return f"{self.column} {text!r} cannot be read ({self.reason})"


MAX_PROGRESS_MESSAGE = 1000  # characters of a progress message kept


class RunningJobs:
    """What a worker process knows of its running jobs beyond the rows:
    which were cancelled (a NOTIFY the worker routes here) and the latest
    progress each reported, not yet written. One per process; a Job reads
    it by id, so a job costs nothing here until one of these happens."""

    def __init__(self) -> None:
        self.cancelled: set[int] = set()
        self.progress: dict[int, tuple[Any, dict[str, Any]]] = {}  # (lease token, report)

    def forget(self, job_id: int) -> None:
        self.cancelled.discard(job_id)
        self.progress.pop(job_id, None)


RUNNING = RunningJobs()


@dataclass(frozen=True)
class Job:
    """A job as a handler sees it (plus the lease that fences its writes)."""

    id: int
    type: str
    queue: str
    payload: Mapping[str, Any]
    priority: int
    attempt: int
    max_attempts: int
    idempotency_key: str | None
    created_at: datetime
    run_at: datetime | None = None
    timeout: float | None = None
    lease_token: Any = field(default=None, repr=False, compare=False)
    # When this attempt was claimed, by the database's clock (as run_at is):
    # the job's wait is started_at - run_at, never the host's wall clock.
    started_at: datetime | None = field(default=None, repr=False, compare=False)

    @property
    def cancelled(self) -> bool:
        """True once someone cancelled this job while it runs (pulsed.cancel,
        pulsectl cancel, POST /jobs/ID/cancel): stop soon. worker.cancel_grace
        seconds later a handler still running is stopped."""
        return self.id in RUNNING.cancelled

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far along the job is (0.0 to 1.0, and a short note).
        Cheap to call in a loop: the worker writes the latest report about
        once a second, fenced by this attempt's lease."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ValueError(f"progress fraction must be a number from 0 to 1, got {fraction!r}")
        try:
            value = float(fraction)  # what is kept is checked: a subclass's __float__ may differ
        except OverflowError:  # an int past a float's range
            value = math.inf
        if not 0.0 <= value <= 1.0:  # NaN too: jsonb refused it, and the batch's writes
            raise ValueError(f"progress fraction must be a number from 0 to 1, got {fraction!r}")
        if message is not None and not isinstance(message, str):
            raise TypeError(f"progress message must be a string or None, got "
                            f"{type(message).__name__}")
        if message is not None:
            message = message[:MAX_PROGRESS_MESSAGE].replace("\x00", "")
            message = message.encode("utf-8", "replace").decode("utf-8")
        # with this attempt's lease: a report made after the attempt ended
        # (from a thread it left behind) is not written into the next one
        RUNNING.progress[self.id] = (self.lease_token, {"fraction": value, "message": message,
                                                        "at": time.time()})


@dataclass(frozen=True)
class Attempt:
    """One ended attempt of a job, as shown by `pulsectl job` and the API."""

    attempt: int
    worker: str | None
    started_at: datetime | None
    finished_at: datetime | None
    outcome: str
    error_class: str | None = None
    error_message: str | None = None
    traceback: str | None = None


@dataclass(frozen=True)
class JobRecord:
    """A job as stored: everything an operator or script can see (SPEC §9).
    A value Python cannot read (a timestamp past year 9999, say) is an
    Unreadable: PostgreSQL's text of it, so the job can still be shown."""

    id: int
    type: str
    queue: str
    state: JobState
    priority: int
    attempt: int
    max_attempts: int
    payload: Mapping[str, Any]
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    idempotency_key: str | None
    last_error: str | None
    lease_owner: str | None
    attempts: tuple[Attempt, ...] | None = None
    result: Any = None  # the handler's return value (JSON), when it returned one
    progress: Any = None  # {fraction, message, at}: the latest a running handler reported
    # The scope of idempotency_key (migration 0010): "unfinished", or held
    # until unique_until; key_released_at: when an enqueue took it over.
    unique_while: str | None = None
    unique_until: datetime | None = None
    key_released_at: datetime | None = None
