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

import logging
import os
import random
import signal
import threading
import time
import traceback as traceback_module
import asyncio
import inspect
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import psycopg

from pulsed import logs, metrics
from pulsed.aio import AsyncRunner
from pulsed.api import Fail, Handler, HandlerRegistry, Snooze, handlers as default_handlers
from pulsed.board import FLUSH_AT_ENTRIES
from pulsed.db.store import CLAIM_SESSION, Store, TypeLimit, session_options
from pulsed.lease import GIVE_BACK_AFTER_S, LeaseKeeper
from pulsed.ledger import JobBoard, JobLedger, NoBoard
from pulsed.metrics import JobReport
from pulsed.jobs import (BACKOFF_BASE_S, BACKOFF_CAP_S, BACKOFF_JITTER, DEFAULT_POISON_AFTER,
                         Job, JobState, Outcome)

log = logging.getLogger(__name__)

MAX_TRACEBACK_CHARS = 16_000
WAIT_SLICE_S = 0.1  # how often an idle worker looks at its stop flag
RECONNECT_BASE_S = 0.2
RECONNECT_CAP_S = 5.0
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
MIN_RATE_POLL_S = 0.01  # a throttled worker polls for a rate token this often at most
# How often a worker looks up which types have jobs waiting: while some of
# them have no handler here, it claims each handled type apart
# (job_claim_by_type), instead of walking past the others' jobs per claim.
TYPES_PROBE_S = 5.0
COMPLETED = Outcome.COMPLETED.value  # read per job: an enum member's .value is a property call


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


class _NoStatus(NoBoard):
    def idle(self) -> None:
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
    node_id: str | None = None  # registers its handled types under this node (None: not)


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
        self._conn: psycopg.Connection | None = None
        self._conn_lock = threading.RLock()  # the main thread, job threads, the keeper
        self._listening = False  # for wake-ups (NOTIFY), on this connection
        self._claim_session = False  # the connection has CLAIM_SESSION's settings
        self._saturated = False  # the last claim got all it asked for: more are waiting
        self._keeper = LeaseKeeper(self.ledger, self.db, options.lease_ttl,
                                   give_back_after=(GIVE_BACK_AFTER_S if options.concurrency == 1
                                                    else None))
        self._keeper.on_tick = self._flush_behind_long_job
        self._aio = AsyncRunner()
        self._reports: list[JobReport] = []  # finished jobs' metrics and log lines, unsent
        self._reports_since = 0.0
        self._reports_lock = threading.Lock()
        self._avg_duration: float | None = None
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
        failures = 0
        while not should_stop():
            try:
                if not step():
                    return
                failures = 0
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                failures += 1
                self._connection_lost(exc, failures, should_stop)

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
        threads and async ones on the event loop, each free slot filled by
        a claim of that size. No prefetch here, so no job ever waits behind
        another. Soft timeouts: async jobs are cancelled at their timeout;
        a threaded job past its timeout is stopped by the master's hard
        kill of the whole worker (its siblings are recorded `interrupted`)."""
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
        """One round: fill free slots, else wait. None when the loop ends."""
        size = self.options.concurrency
        if _reached(max_jobs, self.jobs_done + len(running)):
            return None
        if len(running) < size and not paused():
            jobs = self.claim(self._free_slots(size - len(running), max_jobs))
            if not jobs and not running and not self._listening:
                jobs = self.claim(self._free_slots(size, max_jobs), listen=True)
            running |= {future for job in jobs
                        if (future := self._dispatch(pool, job)) is not None}
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

    def _dispatch(self, pool: ThreadPoolExecutor, job: Job) -> Future[Any] | None:
        """Start a claimed job on the event loop or a thread."""
        handler = self._handler(job)
        if handler is not None and handler.is_async:
            timeout = self._timeout_for(job)
            if not self.ledger.start(job, timeout):
                return None
            return self._aio.submit(self._run_async(job, handler, timeout))
        return pool.submit(self.run_job, job, soft_timeout=False)

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
        self._flush_reports()
        options = self.options
        change = True if listen else (False if self._listening and self._saturated else None)
        with self.db() as store:  # connecting may fail: before the completions are taken
            by_type = self._claim_by_type(store)
            done = self.ledger.take_finished()
            try:
                held, jobs = store.complete_and_claim(
                    done, owner=options.owner, limit=limit, lease_ttl=options.lease_ttl,
                    queues=options.queues or None, aging=options.aging, limits=options.limits,
                    default_attempts=self._default_attempts, handled=self._handled,
                    by_type=by_type, listen=change, claim_session=self._claim_session)
            except BaseException:
                self.ledger.write_failed(done)  # not written: sent next time
                raise
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
        return jobs

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
        self._flush_reports()
        with self.db() as store:
            done = self.ledger.take_finished()
            if not done:
                return
            try:
                held = store.complete(done)
            except BaseException:
                self.ledger.write_failed(done)
                raise
            self.ledger.written(done)
        _warn_lost(done, held)

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

    def _connection_lost(self, exc: Exception, failures: int,
                         should_stop: Callable[[], bool]) -> None:
        """Back off (capped, jittered) before reconnecting; never spin.
        Unwritten completions are kept and sent with the next claim: the
        lease fence drops any whose lease was reaped meanwhile."""
        delay = min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2 ** (failures - 1))
        delay *= random.uniform(0.5, 1.0)
        log.warning("database connection lost (%s); reconnecting in %.1fs", exc, delay)
        self.close()
        _sleep_until(should_stop, delay)

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
                conn = self.connection()
                for _ in conn.notifies(timeout=min(remaining, WAIT_SLICE_S), stop_after=1):
                    return

    def _listen(self) -> None:
        with self.db() as store:
            store.listen_for_wakeups()
        self._listening = True

    def _take_wakeups(self) -> int:
        """Discard the NOTIFYs that arrived while the worker was busy; how
        many there were. Without this, a worker that never idles keeps one
        per enqueue in memory, and when it does idle each one costs an
        empty claim (100,000 queued wake-ups: 100,000 claims in a row)."""
        taken = 0
        with self._conn_lock:
            for _ in self.connection().notifies(timeout=0):
                taken += 1
        return taken

    # -- one job ------------------------------------------------------------------

    def _handler(self, job: Job) -> Handler | None:
        return self.registry.get(job.type) if job.type in self.registry else None

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
            return self._aio.submit(self._run_async(job, handler, timeout)).result()
        started = time.monotonic()
        error: BaseException | None = None
        try:
            if handler is None:
                self.registry.get(job.type)  # raises HandlerNotFound, recorded below
            with _alarm(timeout if soft_timeout else None):
                _check_not_awaitable(job, handler.func(job))  # type: ignore[union-attr]
        except KeyboardInterrupt:
            self.ledger.finish(job, completed=False)  # its lease expires; the reaper frees it
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure is recorded,
            # SystemExit too: a handler calling sys.exit() fails its job, not the worker
            error = exc
        return self._conclude(job, error, started)

    async def _run_async(self, job: Job, handler: Handler, timeout: float | None) -> bool:
        """An async handler's job, on the event loop: awaited under its
        timeout (the task is cancelled then; the master's hard kill follows
        if it does not end). Failures are written from a thread, never by
        blocking the loop."""
        started = time.monotonic()
        error = await _await_handler(job, handler, timeout)
        if error is None:
            return self._conclude(job, None, started)  # no I/O: the batch writes it
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._conclude, job, error, started)

    def _conclude(self, job: Job, error: BaseException | None, started: float) -> bool:
        """Record how the attempt ended; True when it completed."""
        outcome, state = COMPLETED, None
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
            self.ledger.finish(job, completed=outcome == COMPLETED)
        elapsed = time.monotonic() - started
        self._report(JobReport(job, outcome, elapsed, state, time.time()))
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

    def _flush_reports(self) -> None:
        """The metrics and log lines of the jobs finished since the last
        call, written together: with the completions, or by the lease
        keeper's thread while a later job runs long."""
        with self._reports_lock:
            reports, self._reports = self._reports, []
        if reports:
            metrics.jobs_finished(reports)
            logs.job_outcomes(log, reports)

    def _flush_behind_long_job(self) -> None:
        """The lease keeper's thread, each tick: outcomes older than
        FLUSH_AFTER_S (their job ended, and a later one is still running,
        or the node drains) are written from here instead of waiting for
        the next claim."""
        with self._reports_lock:
            reports_due = bool(self._reports) and (
                time.monotonic() - self._reports_since > FLUSH_AFTER_S)
        if reports_due:
            self._flush_reports()
        if self.ledger.finished_for() > FLUSH_AFTER_S:
            self.flush()

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
        if job.timeout:
            return job.timeout
        if job.type in self.registry and self.registry.get(job.type).timeout:
            return self.registry.get(job.type).timeout
        return self.options.type_timeouts.get(job.type)

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
                self._conn = psycopg.connect(
                    self.dsn, autocommit=True, connect_timeout=10,
                    application_name=f"pulse worker {self.options.owner}",
                    options=session_options(self.dsn, CLAIM_SESSION))
                self._listening = False
                self._claim_session = self._has_claim_session(self._conn)
            return self._conn

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
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _check_not_awaitable(job: Job, result: object) -> None:
    """A plain function that returns an awaitable never ran its work:
    fail the attempt instead of recording a completion."""
    if inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if callable(close):
            close()  # no "never awaited" warning: the error below says it
        raise TypeError(f"the handler of {job.type!r} returned {type(result).__name__} "
                        "without awaiting it; declare it `async def` so Pulse awaits it")


async def _await_handler(job: Job, handler: Handler, timeout: float | None
                         ) -> BaseException | None:
    """Await an async handler under its timeout; the exception it ended
    with (JobTimeout when the timeout cancelled it), or None."""
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            await handler.func(job)
    except TimeoutError as exc:
        return JobTimeout("job ran past its timeout") if deadline.expired() else exc
    except BaseException as exc:  # noqa: BLE001 - recorded like a sync handler's
        return exc
    return None


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
