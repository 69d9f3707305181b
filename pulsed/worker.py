"""The worker loop: claim jobs, run their handlers, record the outcomes.

Used in-process by `pulsed.run_worker()` and by each forked worker child.
One Worker owns one connection (autocommit), shared by its threads through
`db()`. It claims batches sized to the work it can start soon, and sends
the completions of one batch with the claim of the next, in one transaction
and one round trip. It LISTENs for new jobs only while idle: LISTEN goes
with the last claim before a wait, UNLISTEN with the claim after a full
batch.

Every job the process holds is in its JobLedger (pulsed/ledger.py), through
named states; the status board mirrors the started ones so the master can
account for them if the process dies. Three ways to run handlers:

- concurrency 1: one job at a time on the main thread, from prefetched
  batches (the fast path for short jobs); a soft timeout (SIGALRM) first.
- concurrency N: sync handlers on N threads, `async def` handlers on one
  event loop (pulsed/aio.py), N jobs at once in all, no prefetch.
- an `async def` handler at concurrency 1 runs on the loop, one at a time.

A LeaseKeeper thread (pulsed/lease.py) renews leases from the ledger, gives
back prefetched jobs held up for over a second and writes completions that
waited too long. Delivery is at-least-once: a crash between a handler
returning and its completion being written runs the job again.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import random
import signal
import threading
import time
import traceback as traceback_module
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import datetime, timezone
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import psycopg

from pulsed import logs, metrics
from pulsed.aio import AsyncRunner
from pulsed.api import Fail, Handler, HandlerRegistry, Snooze, handlers as default_handlers
from pulsed.board import FLUSH_AT_ENTRIES
from pulsed.config import DEFAULT_CANCEL_GRACE, DEFAULT_MAX_RESULT_BYTES
from pulsed.db.connect import Backoff, connect
from pulsed.db.store import CLAIM_SESSION, Store, TypeLimit
from pulsed.lease import LeaseKeeper
from pulsed.ledger import Held, JobBoard, JobLedger, NoBoard
from pulsed.metrics import JobReport
from pulsed.jobs import (BACKOFF_BASE_S, BACKOFF_CAP_S, BACKOFF_JITTER, DEFAULT_POISON_AFTER,
                         RUNNING, Job, JobState, Outcome)

log = logging.getLogger(__name__)

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
DEFAULT_PREFETCH = 500
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
    base = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, attempt - 1))
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
    lease_ttl: float = 30.0
    poll_interval: float = 1.0
    prefetch: int = DEFAULT_PREFETCH  # the most jobs claimed at once
    concurrency: int = 1  # jobs at once: threads for sync handlers, the loop for async ones
    queues: tuple[str, ...] = ()
    aging: float = 60.0  # seconds; 0 = strict priority order (WorkerConfig's default)
    limits: tuple[TypeLimit, ...] = ()  # types with cluster-wide limits
    type_timeouts: dict[str, float] = field(default_factory=dict)
    type_attempts: dict[str, int] = field(default_factory=dict)  # [types] max_attempts
    backoff: Callable[[int], float] = backoff_seconds
    poison_after: int = DEFAULT_POISON_AFTER
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    cancel_grace: float = DEFAULT_CANCEL_GRACE
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


class Worker:
    """Claims batches sized to what it can start soon, runs them (one by
    one, or up to `concurrency` at once), and writes their completions
    together with the next claim."""

    def __init__(self, dsn: str, options: WorkerOptions, *,
                 registry: HandlerRegistry | None = None,
                 status: WorkerStatus | None = None) -> None:
        self.dsn = dsn
        self.options = options
        self.registry = registry or default_handlers
        self.status = status or _NoStatus()
        self.ledger = JobLedger(self.status)
        self._pid = os.getpid()  # a handler's forked child is not this worker
        self._conn: psycopg.Connection | None = None
        self._conn_lock = threading.RLock()  # the main thread, job threads, the keeper
        self._listening = False  # for wake-ups (NOTIFY), on this connection
        self._pooled = options.pooler is not None  # no session state on self._conn
        self._listen_conn: psycopg.Connection | None = None  # pooled: LISTENs on listen_url
        self._cancels_polled_at = 0.0  # pooled, without listen_url: the last look
        self._backoff = Backoff(RECONNECT_BASE_S, RECONNECT_CAP_S)
        self._claim_session = False  # the connection has CLAIM_SESSION's settings
        self._saturated = False  # the last claim got all it asked for: more are waiting
        self._claims_in_doubt = False  # the connection died: a claim may have committed unseen
        self._unreachable_since: float | None = None  # the first of the failures in a row
        self._said_unreachable = False  # in status, until a step succeeds
        self._keeper = LeaseKeeper(self.ledger, self.db, options.lease_ttl)
        self._keeper.on_tick = self._keeper_tick
        self._aio = AsyncRunner()
        self._reports: list[JobReport] = []  # finished jobs' metrics and log lines, unsent
        self._reports_since = 0.0
        self._reports_lock = threading.Lock()
        self._fenced: set[int] = set()  # completions the lease fence refused, not yet reported
        self._avg_duration: float | None = None
        self._types: dict[str, tuple[Handler | None, float | None]] = {}
        self._async_jobs: dict[int, Future[Any]] = {}  # to cancel a cancelled job's task
        self._progress_written = 0.0
        self._wakeup_heard = False  # a wake-up the keeper read for the main thread
        # A job enqueued without max_attempts gets its handler's, else its
        # [types] setting's, else 20, when first claimed.
        self._default_attempts = {**options.type_attempts, **self.registry.max_attempts()}
        # Only the types with a handler here are claimed: others wait for a
        # worker that has one, with their attempts unused.
        self._handled = self.registry.types()
        self._by_type = False  # jobs of other types were waiting at the last probe
        self._types_probed_at: float | None = None

    @property
    def jobs_done(self) -> int:
        return self.ledger.jobs_done

    # -- the loop -----------------------------------------------------------------

    def run(self, *, should_stop: Callable[[], bool] = lambda: False,
            paused: Callable[[], bool] = lambda: False,
            max_jobs: int | None = None, stop_when_idle: bool = False) -> int:
        """Run jobs until should_stop() (checked between jobs), max_jobs
        were run, or (stop_when_idle) nothing is left to claim. While
        paused() (the node drains) nothing is claimed."""
        self._keeper.start()
        loop = self._loop if self.options.concurrency == 1 else self._concurrent_loop
        try:
            loop(should_stop, paused, max_jobs, stop_when_idle)
        finally:
            self._finish_up()
            self._keeper.stop()
            self._aio.close()
            self.close()
        return self.jobs_done

    def _loop(self, should_stop: Callable[[], bool], paused: Callable[[], bool],
              max_jobs: int | None, stop_when_idle: bool) -> None:
        self._guarded(should_stop, lambda: self._step(should_stop, paused, max_jobs,
                                                      stop_when_idle))

    def _guarded(self, should_stop: Callable[[], bool], step: Callable[[], bool]) -> None:
        """Run step() until it says stop; any lost connection, wherever in
        the step it shows, backs off and reconnects instead of crashing."""
        while not should_stop():
            self._leave_if_forked()
            try:
                if not step():
                    return
                self._backoff.reset()
                if self._unreachable_since is not None:
                    self._database_reached()
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self._claims_in_doubt = self.options.sole_owner
                self._connection_lost(exc, should_stop)

    def _step(self, should_stop: Callable[[], bool], paused: Callable[[], bool],
              max_jobs: int | None, stop_when_idle: bool) -> bool:
        """One claim-and-run round; False when the loop should end."""
        if _reached(max_jobs, self.jobs_done):
            return False
        if paused():
            self.flush()
            self.status.idle()
            _sleep_until(should_stop, WAIT_SLICE_S)
            return True
        jobs = self.claim(self._batch_limit(max_jobs))
        if not jobs and not self._listening:
            jobs = self.claim(self._batch_limit(max_jobs), listen=True)
        if jobs:
            self.run_batch(jobs, should_stop)
        elif stop_when_idle:
            return False
        else:
            self.status.idle()
            self.wait_for_jobs(self._idle_wait(), should_stop)
        return True

    def _concurrent_loop(self, should_stop: Callable[[], bool], paused: Callable[[], bool],
                         max_jobs: int | None, stop_when_idle: bool) -> None:
        """concurrency > 1: up to that many jobs at once, sync handlers on
        threads and async ones on the event loop. A freed slot starts a job
        from a small reserve at once, then one claim refills the free slots
        and the reserve (a claim round trip per freed slot cost 13% of the
        I/O-bound throughput, bench W6). The reserve is what finishes during
        about one claim (RESERVE_S of work at the average job length), none
        for long jobs, and a reserved job waiting over GIVE_BACK_AFTER_S
        goes back to the queue. Soft timeouts: async jobs are cancelled at
        their timeout; a threaded job past its timeout is stopped by the
        master's hard kill of the whole worker (its siblings are recorded
        `interrupted`)."""
        running: set[Future[Any]] = set()
        with ThreadPoolExecutor(self.options.concurrency, thread_name_prefix="pulse-job") as pool:
            def step() -> bool:
                nonlocal running
                running = self._concurrent_step(pool, running, should_stop, paused, max_jobs,
                                                stop_when_idle)
                return running is not None
            self._guarded(should_stop, step)
            wait(running or ())  # a stop lets running jobs finish

    def _concurrent_step(self, pool: ThreadPoolExecutor, running: set[Future[Any]],
                         should_stop: Callable[[], bool], paused: Callable[[], bool],
                         max_jobs: int | None, stop_when_idle: bool) -> Any:
        """One round: fill free slots (reserve first, then a claim), else
        wait. None when the loop ends."""
        size = self.options.concurrency
        if _reached(max_jobs, self.jobs_done + len(running)):
            return None
        if len(running) < size and not paused():
            free = self._free_slots(size - len(running), max_jobs)
            running |= self._start_all(pool, self.ledger.prefetched(free))
            free = self._free_slots(size - len(running), max_jobs)
            want = free + self._reserve_size() - self.ledger.count(Held.PREFETCHED)
            jobs = self.claim(want) if want > 0 else []
            if not jobs and not running and not self._listening:
                jobs = self.claim(self._free_slots(size, max_jobs), listen=True)
            running |= self._start_all(pool, jobs[:free])
            if jobs:
                return running
            if stop_when_idle and not running:
                return None
        if running:
            _, running = wait(running, timeout=self.options.poll_interval,
                              return_when=FIRST_COMPLETED)
        else:
            self.status.idle()
            self.wait_for_jobs(self._idle_wait(), should_stop)
        return running

    def _reserve_size(self) -> int:
        """Jobs to hold beyond the free slots: about what the running ones
        finish during one claim round trip."""
        if not self._avg_duration:
            return 0
        reserve = int(self.options.concurrency * RESERVE_S / self._avg_duration)
        return min(reserve, self.options.concurrency)

    def _start_all(self, pool: ThreadPoolExecutor, jobs: list[Job]) -> set[Future[Any]]:
        return {future for job in jobs if (future := self._dispatch(pool, job)) is not None}

    def _dispatch(self, pool: ThreadPoolExecutor, job: Job) -> Future[Any] | None:
        """Start a held job on the event loop or a thread; None when it
        was given back meanwhile."""
        handler = self._handler(job)
        timeout = self._timeout_for(job)
        # Started here, on the main thread: the next round's reserve must
        # not see it as prefetched while its thread spins up.
        if not self.ledger.start(job, timeout):
            return None
        if handler is not None and handler.is_async:
            return self._submit_async(job, handler, timeout)
        return pool.submit(self._run_started, job, handler, None)

    def _submit_async(self, job: Job, handler: Handler, timeout: float | None) -> Future[Any]:
        future = self._aio.submit(self._run_async(job, handler, timeout))
        self._async_jobs[job.id] = future
        future.add_done_callback(lambda _: self._async_jobs.pop(job.id, None))
        return future

    def _free_slots(self, free: int, max_jobs: int | None) -> int:
        if max_jobs is None:
            return free
        return max(1, min(free, max_jobs - self.jobs_done))

    def _batch_limit(self, max_jobs: int | None) -> int:
        """Claim what can start soon: about TARGET_BATCH_S of work at the
        average job duration seen so far (one job until one was timed).
        Never more than the status board can list finished and unwritten."""
        limit = 1
        if self._avg_duration is not None:
            limit = int(TARGET_BATCH_S / max(self._avg_duration, 1e-6))
        limit = max(1, min(limit, self.options.prefetch, FLUSH_AT_ENTRIES))
        if max_jobs is not None:
            limit = min(limit, max_jobs - self.jobs_done)
        return limit

    def _idle_wait(self) -> float:
        """How long an empty claim waits. Rate-limited jobs that are waiting
        for tokens get no NOTIFY when a token comes, so poll for the next one."""
        rated = {t.type: t.rate_per_s / t.rate_count for t in self.options.limits if t.rate_count}
        if not rated:
            return self.options.poll_interval
        with self.db() as store:
            waiting = store.types_with_available_jobs(sorted(rated))
        if not waiting:
            return self.options.poll_interval
        return max(MIN_RATE_POLL_S, min(rated[t] for t in waiting))

    def claim(self, limit: int, *, listen: bool = False) -> list[Job]:
        """Write finished jobs' completions and claim the next batch, one
        round trip. listen=True starts listening for wake-ups first (before
        a wait); the claim after a full batch stops listening (more jobs
        were waiting, so the worker is busy: NOTIFYs would wake its backend
        for nothing). Small batches keep it listening, so light load does
        not flip it on and off per job."""
        self._leave_if_forked()
        options = self.options
        change = True if listen else (False if self._listening and self._saturated else None)
        if self._pooled:
            if listen:
                self._listen()  # on listen_url (or nothing: polling), before the claim
            change = None  # the pooled connection never LISTENs
        with self.db() as store:  # connecting may fail: before the completions are taken
            if self._claims_in_doubt:
                self._give_back_lost_claims(store)
            by_type = self._claim_by_type(store)
            done = self.ledger.take_finished()
            try:
                held, jobs = store.complete_and_claim(
                    done, owner=options.owner, limit=limit, lease_ttl=options.lease_ttl,
                    queues=options.queues or None, aging=options.aging, limits=options.limits,
                    default_attempts=self._default_attempts, handled=self._handled,
                    by_type=by_type, listen=change, claim_session=self._claim_session,
                    results=self.ledger.results(done))
            except BaseException:
                self.ledger.write_failed(done)  # not written: sent next time
                raise
            self._note_fenced(done, held)
            self.ledger.written(done)
            self.ledger.claimed(jobs)
            if change is not None:
                self._listening = change
            self._saturated = len(jobs) >= limit
            if jobs and self._listening:
                # The next claim comes without waiting and sees every job these
                # wake-ups announced: drop them (psycopg keeps them unbounded).
                # Never raise from here: the jobs are held, and only run_batch
                # runs or gives them back (a lost connection shows up there).
                try:
                    self._take_wakeups()
                except psycopg.Error:
                    pass
        _warn_lost(done, held)
        self._flush_reports()  # after the write: what it did not write is not completed
        return jobs

    def _give_back_lost_claims(self, store: Store) -> None:
        """After a lost connection: a claim may have committed on the server
        while its reply was lost, leasing jobs to this worker that it does
        not know it holds. Left alone, their leases would expire into a used
        attempt (with max_attempts = 1, a failure without a run). Give them
        back instead, their attempt undone and no history row, since they
        never ran. Only after a reconnect: nothing on the fast path."""
        lost = store.give_back_owner([self.options.owner], started=self.ledger.held_ids())
        self._claims_in_doubt = False
        if lost:
            store.notify(sorted({r["queue"] for r in lost}))
            log.warning("gave back %d job(s) claimed by a claim whose reply was lost: %s",
                        len(lost), [r["id"] for r in lost])

    def _claim_by_type(self, store: Store) -> bool:
        """Whether jobs of types without a handler here were waiting at the
        last look (one every TYPES_PROBE_S, which also tells the cluster
        again which types this worker handles)."""
        now = time.monotonic()
        if self._types_probed_at is None or now - self._types_probed_at >= TYPES_PROBE_S:
            if self.options.node_id is not None:
                store.worker_types_register(self.options.node_id, os.getpid(), self._handled)
            self._by_type = not set(store.types_waiting()) <= set(self._handled)
            self._types_probed_at = now
        return self._by_type

    def run_batch(self, jobs: list[Job], should_stop: Callable[[], bool] = lambda: False
                  ) -> None:
        """Run a claimed batch in order; give back what is left on a stop
        (or on a lost connection: then, if even that fails, stop renewing
        them so their leases expire and the reaper frees them)."""
        try:
            for job in jobs:
                if should_stop():
                    break
                self.run_job(job)
                if self.ledger.finished_for() > FLUSH_AFTER_S:
                    self.flush()
        finally:
            leftover = self.ledger.take_unstarted()
            try:
                self._give_back(leftover)
            except psycopg.Error as exc:
                log.warning("could not give back %d job(s) (%s); their leases will expire",
                            len(leftover), exc)

    def run_once(self, *, limit: int | None = None) -> int:
        """Claim one batch, run it and write its outcomes; how many were claimed."""
        jobs = self.claim(limit or self.options.prefetch)
        self.run_batch(jobs)
        self.flush()
        return len(jobs)

    def flush(self) -> None:
        """Write completions now (they are otherwise sent with the next claim)."""
        self._leave_if_forked()
        with self.db() as store:
            done = self.ledger.take_finished()
            held: set[int] = set()
            if done:
                try:
                    held = store.complete(done, self.ledger.results(done))
                except BaseException:
                    self.ledger.write_failed(done)
                    raise
                self._note_fenced(done, held)
                self.ledger.written(done)
        _warn_lost(done, held)
        self._flush_reports()

    def _give_back(self, jobs: list[Job]) -> None:
        if jobs:
            with self.db() as store:
                given = store.give_back(jobs)
                if given:
                    store.notify(sorted({r["queue"] for r in given}))

    def _finish_up(self) -> None:
        """On the way out: write completions, return unstarted jobs."""
        self._flush_reports()
        try:
            self._give_back(self.ledger.take_unstarted())
            self.flush()
        except psycopg.Error as exc:
            log.warning("could not write final outcomes (%s); leases will expire and "
                        "the jobs run again", exc)

    def _connection_lost(self, exc: Exception, should_stop: Callable[[], bool]) -> None:
        """Back off (capped, jittered) before reconnecting; never spin.
        Unwritten completions are kept and sent with the next claim: the
        lease fence drops any whose lease was reaped meanwhile."""
        log.warning("database connection lost (%s); reconnecting after a backoff", exc)
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
        elif now - self._unreachable_since >= DB_UNREACHABLE_AFTER_S:
            self._said_unreachable = True
            self.status.database_unreachable(
                f"no database for {now - self._unreachable_since:.0f}s: {_first_line(exc)}")
        self.close()
        self._backoff.wait(should_stop, slice_s=WAIT_SLICE_S)

    def _database_reached(self) -> None:
        self._unreachable_since = None
        if self._said_unreachable:
            self._said_unreachable = False
            self.status.database_reachable()

    def wait_for_jobs(self, timeout: float,
                      should_stop: Callable[[], bool] = lambda: False) -> None:
        """Sleep until a job is enqueued (NOTIFY), timeout passes or
        should_stop(); waits in short slices so a stop is seen quickly and
        the lease keeper gets the connection between them."""
        deadline = time.monotonic() + timeout
        with self._conn_lock:
            if not self._listening:
                # Jobs committed since the caller's last claim sent their NOTIFY
                # to nobody: listen, and let the caller claim again first.
                self._listen()
                return
            if self._take_wakeups():
                return  # jobs may have come since the claim that found none
        while not should_stop():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with self._conn_lock:
                if self._wakeup_heard:  # the lease keeper read it between two slices
                    self._wakeup_heard = False
                    return
                conn = self._notify_connection()
                if conn is not None:
                    for notify in conn.notifies(timeout=min(remaining, WAIT_SLICE_S),
                                                stop_after=1):
                        if self._route(notify):
                            return
            if conn is None:  # a pooler and no listen_url: poll
                time.sleep(min(remaining, WAIT_SLICE_S))

    def _listen(self) -> None:
        if self._pooled:
            self._notify_connection()  # listen_url's connection LISTENs from its start
        else:
            with self.db() as store:
                store.listen_for_wakeups()
        self._listening = True

    def _take_wakeups(self) -> int:
        """Discard the NOTIFYs that arrived while the worker was busy; how
        many there were. Without this, a worker that never idles keeps one
        per enqueue in memory, and when it does idle each one costs an
        empty claim (100,000 queued wake-ups: 100,000 claims in a row)."""
        with self._conn_lock:
            taken = int(self._wakeup_heard)
            self._wakeup_heard = False
            conn = self._notify_connection()
            if conn is not None:
                for notify in conn.notifies(timeout=0):
                    taken += self._route(notify)
        return taken

    def _route(self, notify: Any) -> bool:
        """A notification: True for a wake-up (jobs were enqueued); a
        cancellation is handed to the ledger."""
        if notify.channel == WAKEUPS:
            return True
        self._on_cancel(notify.payload)
        return False

    # -- one job ------------------------------------------------------------------

    def _handler(self, job: Job) -> Handler | None:
        return self._type_info(job.type)[0]

    def _type_info(self, job_type: str) -> tuple[Handler | None, float | None]:
        """A type's handler and default timeout, looked up once per type
        (the registry and the config do not change while a worker runs)."""
        info = self._types.get(job_type)
        if info is None:
            handler = self.registry.get(job_type) if job_type in self.registry else None
            timeout = (handler.timeout if handler is not None and handler.timeout
                       else self.options.type_timeouts.get(job_type))
            info = (handler, timeout)
            if handler is not None:  # an unknown type may be registered later
                self._types[job_type] = info
        return info

    def run_job(self, job: Job, *, soft_timeout: bool = True) -> bool:
        """Run one claimed job on this thread (an async handler: on the
        event loop, waited for here). True when it completed (its
        completion is written with the next batch); failures are written
        here. False too when the job was given back before it started."""
        handler = self._handler(job)
        timeout = self._timeout_for(job)
        if not self.ledger.start(job, timeout):
            return False  # the keeper gave it back while an earlier job ran long
        if handler is not None and handler.is_async:
            try:
                return self._submit_async(job, handler, timeout).result()
            except CancelledError:
                return False  # cancelled past its grace: the ledger let it go
        return self._run_started(job, handler, timeout if soft_timeout else None)

    def _run_started(self, job: Job, handler: Handler | None, soft_timeout: float | None
                     ) -> bool:
        """A started job's sync handler, on this thread, under its soft
        timeout (main thread only: SIGALRM)."""
        started = time.monotonic()
        error: BaseException | None = None
        result: str | None = None
        try:
            if handler is None:
                self.registry.get(job.type)  # raises HandlerNotFound, recorded below
            with _alarm(soft_timeout):
                value = handler.func(job)  # type: ignore[union-attr]
            _check_not_awaitable(job, value)
            result = self._result_json(value)
        except KeyboardInterrupt:
            self._leave_if_forked()
            self.ledger.finish(job, completed=False)  # its lease expires; the reaper frees it
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure is recorded,
            # SystemExit too: a handler calling sys.exit() fails its job, not the worker
            error = exc
        self._leave_if_forked(error)
        return self._conclude(job, error, started, result)

    async def _run_async(self, job: Job, handler: Handler, timeout: float | None) -> bool:
        """An async handler's job, on the event loop: awaited under its
        timeout (the task is cancelled then; the master's hard kill follows
        if it does not end). Failures are written from a thread, never by
        blocking the loop."""
        started = time.monotonic()
        error, value = await _await_handler(job, handler, timeout)
        self._leave_if_forked(error)
        if error is None:
            try:
                result = self._result_json(value)
            except ResultNotStorable as exc:
                error = exc
            else:  # no I/O: the batch writes it
                return self._conclude(job, None, started, result)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._conclude, job, error, started)

    def _result_json(self, value: object) -> str | None:
        """A handler's return value as the JSON text its completion
        carries; ResultNotStorable (the attempt fails, saying why) when
        PostgreSQL's jsonb cannot hold it or it is over max_result_bytes."""
        if value is None:
            return None
        return encode_result(value, self.options.max_result_bytes)

    def _leave_if_forked(self, error: BaseException | None = None) -> None:
        """A handler that forks returns twice: in this worker and in its
        child. The child holds a copy of the worker's connection, leases
        and ledger, so it must run no Pulse code: it leaves at once, with
        the status a SystemExit asked for (1 for another error, 0 when the
        handler returned)."""
        if os.getpid() == self._pid:
            return
        code = 0 if error is None else FORKED_CHILD_FAILED
        if isinstance(error, SystemExit):
            code = error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
        os._exit(code)

    def _conclude(self, job: Job, error: BaseException | None, started: float,
                  result: str | None = None) -> bool:
        """Record how the attempt ended; True when it completed."""
        outcome, state = COMPLETED, None
        if job.cancelled:  # the row is `cancelled` already and the lease gone: write nothing
            self.ledger.finish(job, completed=False)
            log.info("job %s#%d: its handler ended after the job was cancelled", job.type, job.id)
            return False
        try:
            if isinstance(error, Snooze):
                outcome = Outcome.SNOOZED.value
                with self.db() as store:
                    state = store.snooze(job, error.seconds)
            elif error is not None:
                outcome, state = self._record_failure(job, error)
        finally:
            # Even if recording failed: the job leaves the ledger, its lease
            # expires and the reaper records it.
            self.ledger.finish(job, completed=outcome == COMPLETED, result=result)
        elapsed = time.monotonic() - started
        failure = _safe_str(error) if error is not None and outcome != Outcome.SNOOZED.value \
            else None
        self._report(JobReport(job, outcome, elapsed, state, time.time(), failure))
        self._avg_duration = elapsed if self._avg_duration is None else (
            self._avg_duration * (1 - EWMA_WEIGHT) + elapsed * EWMA_WEIGHT)
        return outcome == COMPLETED

    def _report(self, report: JobReport) -> None:
        with self._reports_lock:
            if not self._reports:
                self._reports_since = time.monotonic()
            self._reports.append(report)
        if report.outcome != COMPLETED:
            self._flush_reports()  # rare, and its database write was just made

    def _note_fenced(self, done: list[Job], held: set[int]) -> None:
        """Completions the lease fence refused (the lease was reaped or
        taken over) are reported as lost, not completed. Noted before the
        jobs leave the ledger, so no flush can count them completed."""
        if len(held) < len(done):
            with self._reports_lock:
                self._fenced.update(job.id for job in done if job.id not in held)

    def _flush_reports(self) -> None:
        """The metrics and log lines of the jobs finished since the last
        call, written together: with the completions, or by the lease
        keeper's thread while a later job runs long. A completed job is
        reported once its completion was written (fenced: as lost), so
        /metrics counts what the database has."""
        unwritten = self.ledger.unwritten_ids()
        with self._reports_lock:
            reports, self._reports = self._reports, []
            if unwritten:
                self._reports = [r for r in reports
                                 if r.outcome == COMPLETED and r.job.id in unwritten]
                reports = [r for r in reports
                           if r.outcome != COMPLETED or r.job.id not in unwritten]
            if self._fenced:
                reports = [self._fence_report(r) for r in reports]
        if reports:
            metrics.jobs_finished(reports)
            logs.job_outcomes(log, reports)

    def _keeper_tick(self) -> None:
        """Every lease keeper tick: late completions, cancellations heard
        while handlers run, progress reports, cancelled tasks past grace."""
        self._flush_behind_long_job()
        self._route_pending_notifies()
        self._write_progress()
        self._stop_cancelled()

    def _route_pending_notifies(self) -> None:
        """Hear cancellations that came while handlers run (the main thread
        may not read its connection for a long time). Only on an open
        connection: a keeper with nothing else to do never connects (with
        the database refusing connections it would try twice a second). A
        wake-up read here is not lost: the main thread's wait sees the flag."""
        with self._conn_lock:
            conn = self._listen_conn if self._pooled else self._conn
            if conn is None or conn.closed:
                self._poll_cancels()
                return
            for notify in conn.notifies(timeout=0):
                if self._route(notify):
                    self._wakeup_heard = True

    def _write_progress(self) -> None:
        now = time.monotonic()
        if now - self._progress_written < PROGRESS_EVERY_S:
            return
        jobs = self.ledger.progress_due()
        if not jobs:
            return
        reports = [RUNNING.progress.pop(job.id, None) for job in jobs]
        pairs = [(job, _progress_json(report)) for job, report in zip(jobs, reports) if report]
        if pairs:
            with self.db() as store:
                store.write_progress([job for job, _ in pairs], [text for _, text in pairs])
        self._progress_written = now

    def _stop_cancelled(self) -> None:
        """Cancelled jobs still running past cancel_grace: an async task is
        cancelled here; a sync handler is stopped by the master, which
        kills the process at the deadline the cancel set on the board."""
        for job in self.ledger.cancelled_overdue():
            future = self._async_jobs.get(job.id)
            if future is not None and future.cancel():
                log.warning("job %s#%d: still running %.0fs after it was cancelled; its task "
                            "is cancelled", job.type, job.id, self.options.cancel_grace)

    def _on_cancel(self, payload: str) -> None:
        try:
            job_id = int(payload)
        except ValueError:
            return
        job = self.ledger.cancelled(job_id, self.options.cancel_grace)
        if job is not None:
            log.info("job %s#%d was cancelled; its handler has %.0fs to stop", job.type, job.id,
                     self.options.cancel_grace)

    def _fence_report(self, report: JobReport) -> JobReport:
        if report.outcome != COMPLETED or report.job.id not in self._fenced:
            return report
        self._fenced.discard(report.job.id)
        return report._replace(outcome=metrics.FENCED)

    def _flush_behind_long_job(self) -> None:
        """The lease keeper's thread, each tick: outcomes older than
        FLUSH_AFTER_S (their job ended, and a later one is still running,
        or the node drains) are written from here instead of waiting for
        the next claim."""
        if self.ledger.finished_for() > FLUSH_AFTER_S:
            self.flush()  # reports the completions it writes
        with self._reports_lock:
            reports_due = bool(self._reports) and (
                time.monotonic() - self._reports_since > FLUSH_AFTER_S)
        if reports_due:
            self._flush_reports()

    def _record_failure(self, job: Job, exc: BaseException) -> tuple[str, JobState | None]:
        timed_out = isinstance(exc, JobTimeout)
        outcome = Outcome.TIMEOUT.value if timed_out else Outcome.ERROR.value
        with self.db() as store:
            state = store.record_error(
                job, retry=not isinstance(exc, Fail), backoff=self.options.backoff(job.attempt),
                outcome=outcome, error_class=type(exc).__qualname__, message=_safe_str(exc),
                traceback=_safe_traceback(exc), poison_after=self.options.poison_after)
        if state is None:
            log.warning("job %s#%d: lease lost before its failure was recorded", job.type, job.id)
        elif state is JobState.FAILED:
            log.error("job %s#%d failed for good: %s", job.type, job.id, _safe_str(exc))
        return outcome, state

    def _timeout_for(self, job: Job) -> float | None:
        return job.timeout or self._type_info(job.type)[1]

    # -- connection ---------------------------------------------------------------

    @contextmanager
    def db(self) -> Iterator[Store]:
        """The worker's connection, for one thread at a time: the main
        loop, job threads recording failures and the lease keeper share it
        (psycopg's own lock does not cover a whole pipeline)."""
        with self._conn_lock:
            yield Store(self.connection())

    def connection(self) -> psycopg.Connection:
        with self._conn_lock:
            if self._conn is None or self._conn.closed:
                options = self.options
                self._conn = connect(self.dsn, "worker", instance=options.owner,
                                     settings=CLAIM_SESSION, pooler=options.pooler)
                self._listening = False
                if self._pooled:
                    # Each claim sets its plan settings in its own transaction.
                    self._claim_session = False
                else:
                    self._claim_session = self._has_claim_session(self._conn)
                    Store(self._conn).listen_for_cancels()
            return self._conn

    def _notify_connection(self) -> psycopg.Connection | None:
        """Where wake-ups and cancels arrive: the worker's connection, or
        behind a pooler the direct one to listen_url (LISTEN is session
        state: through PgBouncer in transaction mode it would be lost),
        or None there without a listen_url (the worker polls)."""
        if not self._pooled:
            return self.connection()
        if self.options.listen_url is None:
            return None
        with self._conn_lock:
            if self._listen_conn is None or self._listen_conn.closed:
                conn = connect(self.options.listen_url, "worker",
                               instance=f"{self.options.owner} listen")
                store = Store(conn)
                store.listen_for_wakeups()
                store.listen_for_cancels()
                self._listen_conn = conn
            return self._listen_conn

    def _poll_cancels(self) -> None:
        """Behind a pooler without listen_url no cancel NOTIFY comes: look
        for cancelled jobs among the running ones every poll_interval."""
        if not self._pooled or self.options.listen_url is not None:
            return
        now = time.monotonic()
        running = [job.id for job in self.ledger.running()]
        if not running or now - self._cancels_polled_at < self.options.poll_interval:
            return
        self._cancels_polled_at = now
        with self.db() as store:
            cancelled = store.cancelled_among(running)
        for job_id in cancelled:
            self._on_cancel(str(job_id))

    def _has_claim_session(self, conn: psycopg.Connection) -> bool:
        """Did the server apply CLAIM_SESSION? A pooler may drop startup
        options; then each claim sets its plan settings itself."""
        if conn.execute("SHOW enable_sort").fetchone()[0] == "off":
            return True
        log.warning("the connection's options were not applied (a pooler dropping them?); "
                    "each claim sets its plan settings itself")
        return False

    def store(self) -> Store:
        return Store(self.connection())

    def close(self) -> None:
        with self._conn_lock:
            for conn in (self._conn, self._listen_conn):
                if conn is not None:
                    conn.close()
            self._conn = self._listen_conn = None


def _check_not_awaitable(job: Job, result: object) -> None:
    """A plain function that returns an awaitable never ran its work:
    fail the attempt instead of recording a completion."""
    if result is not None and inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if callable(close):
            close()  # no "never awaited" warning: the error below says it
        raise TypeError(f"the handler of {job.type!r} returned {type(result).__name__} "
                        "without awaiting it; declare it `async def` so Pulse awaits it")


async def _await_handler(job: Job, handler: Handler, timeout: float | None
                         ) -> tuple[BaseException | None, object]:
    """Await an async handler under its timeout: (the exception it ended
    with, JobTimeout when the timeout cancelled it, or None; its value)."""
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            return None, await handler.func(job)
    except TimeoutError as exc:
        return (JobTimeout("job ran past its timeout") if deadline.expired() else exc), None
    except BaseException as exc:  # noqa: BLE001 - recorded like a sync handler's
        return exc, None


def _progress_json(report: dict[str, Any]) -> str:
    at = datetime.fromtimestamp(report["at"], timezone.utc).isoformat()
    return json.dumps({**report, "at": at}, ensure_ascii=False)


class ResultNotStorable(ValueError):
    """The handler's return value cannot be stored as the job's result."""


def encode_result(value: object, max_bytes: int) -> str:
    """JSON text for jsonb: no NaN/Infinity, no NUL (jsonb refuses
    \\u0000), no lone surrogates, at most max_bytes of UTF-8."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as exc:
        raise ResultNotStorable(f"the handler's return value cannot be stored as the job's "
                                f"result ({type(exc).__name__}: {exc}); return JSON data "
                                "(dict, list, str, number, bool) or None") from None
    if "\\u0000" in text or "\x00" in text:
        raise ResultNotStorable("the handler's return value contains a NUL character, which "
                                "PostgreSQL's jsonb cannot store as the job's result; strip it "
                                "or encode the data")
    if size > max_bytes:
        raise ResultNotStorable(f"the handler's return value is {size:,} bytes as JSON, over "
                                f"worker.max_result_bytes ({max_bytes:,}); store large data "
                                "elsewhere and return a reference to it")
    return text


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _reached(max_jobs: int | None, count: int) -> bool:
    return max_jobs is not None and count >= max_jobs


def _warn_lost(done: list[Job], held: set[int]) -> None:
    for job in done:
        if job.id not in held:
            log.warning("job %s#%d: lease lost before completion; its result is dropped",
                        job.type, job.id)


class _alarm:
    """Raise JobTimeout in the main thread once `seconds` pass (a soft
    limit, as Celery's; the master's kill is the hard one). Armed only
    around the handler, never around Pulse's own database writes."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.active = bool(seconds) and threading.current_thread() is threading.main_thread()

    def __enter__(self) -> None:
        if self.active:
            self._previous = signal.signal(signal.SIGALRM, _raise_timeout)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)


def _sleep_until(should_stop: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not should_stop() and time.monotonic() < deadline:
        time.sleep(min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic())))


def _raise_timeout(signum: int, frame: object) -> None:
    raise JobTimeout("job ran past its timeout")


def _storable(text: str) -> str:
    """Text PostgreSQL accepts: NULs and lone surrogates escaped."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _safe_str(exc: BaseException) -> str:
    """str(exc), even for exceptions whose __str__ raises."""
    try:
        return _storable(f"{type(exc).__qualname__}: {exc}"[:4000])
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the outcome
        return f"{type(exc).__qualname__}: <unprintable exception>"


def _safe_traceback(exc: BaseException) -> str:
    try:
        text = "".join(traceback_module.format_exception(exc))
    except Exception:  # noqa: BLE001
        text = f"<traceback unavailable for {type(exc).__qualname__}>"
    return _storable(text[-MAX_TRACEBACK_CHARS:])


def run_worker(dsn: str, *, owner: str = "local", registry: HandlerRegistry | None = None,
               max_jobs: int | None = None, stop_when_idle: bool = True,
               **options: object) -> int:
    """Run jobs in this process (for tests, scripts and development).

    Returns how many jobs it ran. Stops when nothing is left to claim
    (stop_when_idle) or after max_jobs.
    """
    worker = Worker(dsn, WorkerOptions(owner=owner, **options), registry=registry)  # type: ignore[arg-type]
    return worker.run(max_jobs=max_jobs, stop_when_idle=stop_when_idle)
