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

This module is the claim loop; the Worker's other roles are mixins, one a
module: worker_connection (its connection, wake-ups, reconnects),
worker_runners (running one job), worker_completions (writing outcomes,
progress, cancels), worker_concurrent (the loop at concurrency > 1), and
worker_options (settings, constants, the status interface).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import psycopg

from pulsed.aio import AsyncRunner
from pulsed.api import Handler, HandlerRegistry, handlers as default_handlers
from pulsed.board import FLUSH_AT_ENTRIES
from pulsed.db.connect import Backoff
from pulsed.db.store import ClaimTerms, Store
from pulsed.jobs import Job
from pulsed.lease import LeaseKeeper
from pulsed.ledger import JobLedger
from pulsed import metrics
from pulsed.metrics import JobReport
from pulsed.worker_completions import Completions, _warn_lost
from pulsed.worker_concurrent import ConcurrentLoop
from pulsed.worker_connection import WorkerConnection, _sleep_until
from pulsed.worker_runners import JobRunners
# The worker's names as they were before pulsed/worker.py was split by role:
# `from pulsed.worker import ...` keeps working.
from pulsed.worker_options import (  # noqa: F401 - re-exported
    COMPLETED, DB_UNREACHABLE_AFTER_S, DEFAULT_PREFETCH, EWMA_WEIGHT, FLUSH_AFTER_S,
    FORKED_CHILD_FAILED, MAX_TRACEBACK_CHARS, MIN_RATE_POLL_S, PROGRESS_EVERY_S,
    RECONNECT_BASE_S, RECONNECT_CAP_S, RESERVE_S, TARGET_BATCH_S, TYPES_PROBE_S, WAIT_SLICE_S,
    WAKEUPS, JobTimeout, WorkerOptions, WorkerStatus, _NoStatus, _reached, backoff_seconds)
from pulsed.worker_runners import ResultNotStorable, encode_result  # noqa: F401 - re-exported
from pulsed.worker_runners import forks_so_far

log = logging.getLogger(__name__)


class Worker(WorkerConnection, JobRunners, Completions, ConcurrentLoop):
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
        self._forks_seen = forks_so_far()  # no fork since: still this worker's process
        self._conn: psycopg.Connection | None = None
        self._store: Store | None = None  # on self._conn (worker_connection.py: db())
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
        self._claim_terms = ClaimTerms.of(
            owner=options.owner, lease_ttl=options.lease_ttl, queues=options.queues or None,
            aging=options.aging, limits=options.limits, default_attempts=self._default_attempts,
            handled=self._handled)
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
            self._wait_idle(should_stop)
        return True

    def _wait_idle(self, should_stop: Callable[[], bool]) -> None:
        """Nothing to run: wait for a wake-up. Before that, build what a
        finished job's report needs (once; a global's check after): its
        first build imports prometheus_client, 15 ms alone and 50-90 ms
        with 8 workers forked at once, which the first job after an idle
        start would otherwise pay on its way out, holding up the jobs
        claimed with it (W5's worst case grew from ~76 to ~220 ms when the
        master stopped importing it before the first fork)."""
        self.status.idle()
        metrics.prepare()
        self.wait_for_jobs(self._idle_wait(), should_stop)

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
            if done and self._listening:
                self._drop_wakeups()
            try:
                held, jobs = store.complete_and_claim(
                    done, self._claim_terms, limit=limit, by_type=by_type, listen=change,
                    claim_session=self._claim_session, results=self.ledger.results(done))
            except BaseException:
                self.ledger.write_failed(done)  # not written: sent next time
                raise
            self._note_fenced(done, held)
            self.ledger.written(done)
            self.ledger.claimed(jobs)
            if change is not None:
                self._listening = change
            self._saturated = len(jobs) >= limit
        _warn_lost(done, held)
        if done or self._reports:  # after the write: what it did not write is not completed
            self._flush_reports()
        return jobs

    def _drop_wakeups(self) -> None:
        """Before a claim that writes a batch's completions: the wake-ups
        heard while the batch ran announced jobs this claim sees (its
        snapshot comes after them), so drop them (psycopg keeps them
        unbounded; an idle wait would claim once per one left). Not after
        the claim that picks a job up: the poll was ~50 us of a cold
        worker's way from NOTIFY to handler (W2). Never raises: a lost
        connection shows up in the claim."""
        try:
            self._take_wakeups()
        except psycopg.Error:
            pass

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


def run_worker(dsn: str, *, owner: str = "local", registry: HandlerRegistry | None = None,
               max_jobs: int | None = None, stop_when_idle: bool = True,
               **options: object) -> int:
    """Run jobs in this process (for tests, scripts and development).

    Returns how many jobs it ran. Stops when nothing is left to claim
    (stop_when_idle) or after max_jobs.
    """
    worker = Worker(dsn, WorkerOptions(owner=owner, **options), registry=registry)  # type: ignore[arg-type]
    return worker.run(max_jobs=max_jobs, stop_when_idle=stop_when_idle)
