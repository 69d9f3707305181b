"""The worker's settings, tuning constants and status interface
(pulsed/worker.py is the claim loop that uses them)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Protocol

from pulsed.config import WorkerConfig
from pulsed.db.store import TypeLimit
from pulsed.jobs import BACKOFF_BASE_S, BACKOFF_CAP_S, BACKOFF_JITTER, Outcome
from pulsed.ledger import JobBoard, NoBoard

MAX_TRACEBACK_CHARS = 16_000
WAIT_SLICE_S = 0.1  # how often an idle worker looks at its stop flag
RECONNECT_BASE_S = 0.2
RECONNECT_CAP_S = 5.0
# A worker that has not reached the database for this long says so in its
# status (pulsectl status: db_ok false, the error) until it does.
DB_UNREACHABLE_AFTER_S = 5.0
# The most jobs one claim takes; only jobs shorter than TARGET_BATCH_S / 500
# (40 us) reach it. Each claim's index scan first steps over the entries of
# rows claimed just before it, a cost per claim, not per job: PostgreSQL
# spent ~30 us a no-op job at 100 a claim, ~24 at 500 (bench/README.md).
# WorkerOptions' defaults are the config schema's ([worker]), so run_worker()
# and the daemon's workers behave alike (tests/unit/test_defaults.py pins it).
_CONFIGURED = WorkerConfig()
DEFAULT_PREFETCH = _CONFIGURED.prefetch
TARGET_BATCH_S = 0.02  # claim about this much work at once
EWMA_WEIGHT = 0.2
# Completions wait at most this long for the next claim (a batch is sized to
# about TARGET_BATCH_S of work, so only long jobs make them wait alone).
FLUSH_AFTER_S = 0.05
# At concurrency > 1, hold about this much work beyond the free slots: what
# finishes during one claim round trip (~3-7 ms measured under load).
RESERVE_S = 0.01
PROGRESS_EVERY_S = 1.0  # running jobs' progress reports are written this often at most
WAKEUPS = "pulse_jobs"  # the NOTIFY channel of enqueues; pulse_cancel is the other
MIN_RATE_POLL_S = 0.01  # a throttled worker polls for a rate token this often at most
# How often a worker looks up which types have jobs waiting: while some of
# them have no handler here, it claims each handled type apart
# (job_claim_by_type), instead of walking past the others' jobs per claim.
TYPES_PROBE_S = 5.0
COMPLETED = Outcome.COMPLETED.value  # read per job: an enum member's .value is a property call
FORKED_CHILD_FAILED = 1  # the exit status of a handler's forked child that raised


class JobTimeout(Exception):
    """The job ran past its timeout."""


def backoff_seconds(attempt: int) -> float:
    """Exponential backoff with jitter: ~2s, 4s, 8s, … capped at an hour."""
    # The exponent is capped as in SQL's pulse_retry_at: max_attempts goes
    # up to 2**31-1, and 2.0 * 2**1024 overflows a float (the worker's loop
    # died on it; a huge exponent also takes long to compute).
    base = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(max(0, attempt - 1), 40))
    return base * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)


class WorkerStatus(JobBoard, Protocol):
    """Where a worker reports what it does (the master's view of it): its
    started jobs (the ledger's board) and when it idles."""

    def idle(self) -> None: ...
    def database_unreachable(self, error: str) -> None: ...
    def database_reachable(self) -> None: ...


class _NoStatus(NoBoard):
    def idle(self) -> None:
        pass

    def database_unreachable(self, error: str) -> None:
        pass

    def database_reachable(self) -> None:
        pass


@dataclass
class WorkerOptions:
    owner: str
    lease_ttl: float = _CONFIGURED.lease_ttl
    poll_interval: float = _CONFIGURED.poll_interval
    prefetch: int = _CONFIGURED.prefetch  # the most jobs claimed at once
    # jobs at once: threads for sync handlers, the loop for async ones
    concurrency: int = _CONFIGURED.concurrency
    queues: tuple[str, ...] = _CONFIGURED.queues
    aging: float = _CONFIGURED.aging  # seconds; 0 = strict priority order
    limits: tuple[TypeLimit, ...] = ()  # types with cluster-wide limits
    type_timeouts: dict[str, float] = field(default_factory=dict)
    type_attempts: dict[str, int] = field(default_factory=dict)  # [types] max_attempts
    backoff: Callable[[int], float] = backoff_seconds
    poison_after: int = _CONFIGURED.poison_after
    max_result_bytes: int = _CONFIGURED.max_result_bytes
    cancel_grace: float = _CONFIGURED.cancel_grace
    # No other process claims under `owner` (a daemon's worker: node, index
    # and pid): after a lost connection, its running jobs that the ledger
    # does not hold come from a claim whose reply was lost.
    sole_owner: bool = False
    node_id: str | None = None  # registers its handled types under this node (None: not)
    # database.pooler: "transaction" when dsn is PgBouncer in transaction
    # mode. Then nothing uses session state on that connection: wake-ups
    # and cancels come over listen_url (a direct connection), or without
    # one the worker polls at poll_interval.
    pooler: str | None = None
    listen_url: str | None = None


def _reached(max_jobs: int | None, count: int) -> bool:
    """Has a worker limited to max_jobs (None: no limit) run them all?"""
    return max_jobs is not None and count >= max_jobs
