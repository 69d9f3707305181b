"""concurrency > 1: sync handlers on a thread pool and `async def` ones on
the worker's event loop, up to `concurrency` jobs at once in all."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable

from pulsed.api import Handler
from pulsed.jobs import Job
from pulsed.ledger import Held, LedgerError
from pulsed.worker_options import RESERVE_S, _reached

# The worker's records go to one logger, whichever module writes them
# (operators and tests filter on "pulsed.worker").
log = logging.getLogger("pulsed.worker")


THREADS_START_S = 30.0  # the pool's threads, started together: seconds at most


def _start_threads(pool: ThreadPoolExecutor, count: int) -> None:
    """Start the pool's `count` threads now, before any job is held: each
    waits at a barrier, so the pool cannot reuse one for the next. Started
    on the first jobs instead, a thread the host no longer allowed (memory
    a handler took, RLIMIT_AS, a limit on tasks) raised out of the loop and
    ended the worker, and the jobs its other threads ran were recorded
    worker_died. Here it fails the worker's start, holding nothing."""
    barrier = threading.Barrier(count + 1)
    try:
        for _ in range(count):
            pool.submit(barrier.wait, THREADS_START_S)
        barrier.wait(THREADS_START_S)
    except BaseException:
        barrier.abort()  # the threads that did start return
        raise


class ConcurrentLoop:
    """Mixin of Worker: the loop at concurrency > 1."""

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
            _start_threads(pool, self.options.concurrency)
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
            self._wait_idle(should_stop)
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
        future.add_done_callback(lambda done: self._async_job_ended(job, done))
        return future

    def _async_job_ended(self, job: Job, future: Future[Any]) -> None:
        """An async job's task ended. If it raised (its outcome's write,
        not the handler: that is recorded), the job would stay held, its
        lease renewed for as long as the worker lives and its result never
        seen: let it go, so its lease expires and the reaper records the
        attempt."""
        self._async_jobs.pop(job.id, None)
        if future.cancelled() or future.exception() is None:
            return
        log.error("job %s#%d: recording its outcome failed (%r); its lease is left to expire",
                  job.type, job.id, future.exception())
        try:
            self.ledger.finish(job, completed=False)
        except LedgerError:
            pass  # recorded before what raised

    def _free_slots(self, free: int, max_jobs: int | None) -> int:
        if max_jobs is None:
            return free
        return max(1, min(free, max_jobs - self.jobs_done))

