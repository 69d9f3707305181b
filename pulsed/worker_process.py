"""The worker child's start-up: import the handlers, build the Worker
from the config, and report its jobs and state into its board slot."""

from __future__ import annotations

import gc
import logging
import os
import random
import sys
import threading
import time

from pulsed.api import handlers as default_handlers
from pulsed.board import ChildState
from pulsed.children import (ChildRuntime, boot_failed, end_descendants_with_worker,
                             exit_code_for, import_handlers)
from pulsed.config import Config, import_path
from pulsed.contrib.otel import traced_handlers  # issue 18
from pulsed.db.store import TypeLimit
from pulsed.jobs import Job
from pulsed.node import worker_owner
from pulsed.output import JobTaggedStream
from pulsed.worker import Worker, WorkerOptions

log = logging.getLogger(__name__)

RECYCLE_JITTER = 0.1  # recycle after max_jobs * [1, 1.1) so workers part ways
# A worker's collection threshold for the youngest generation (CPython's
# default is 700 container objects more allocated than freed). A batch's
# Jobs, rows, ledger entries and reports live until the batch is written,
# so at 700 a batch of 500 short jobs started ~6 collections that freed
# nothing and promoted it all to be traversed again: 60-100 ms of a worker's
# ~620 ms of CPU for 50,000 no-op jobs, none at 10,000 (bench/README.md,
# session 18). Cycles are still collected, every 10,000 instead of every 700
# allocations. Set before the handler modules import: one that sets its own
# thresholds keeps them.
WORKER_GC_THRESHOLD = 10_000


def type_limits(config: Config) -> tuple[TypeLimit, ...]:
    """The [types] with a cluster-wide concurrency or rate limit."""
    return tuple(
        TypeLimit(name, t.concurrency, t.rate.count if t.rate else None,
                  t.rate.per_seconds if t.rate else None)
        for name, t in sorted(config.types.items()) if t.concurrency or t.rate)


class BoardStatus:
    """The worker's status: its started jobs and its state, as plain
    stores into its board slot (the ledger calls the job methods). It also
    knows which job a thread runs, for the job prefix of printed lines."""

    def __init__(self, runtime: ChildRuntime) -> None:
        self.runtime = runtime
        self._titled: Job | None = None  # the job the process title names
        self._running: dict[int, Job] = {}
        self._thread = threading.local()  # .job: the sync job this thread runs

    def job_started(self, job: Job, deadline: float | None) -> None:
        self.runtime.slot.job_started(job.id, job.type, time.monotonic(), deadline)
        self.runtime.current_job = job
        self._running[job.id] = job
        self._thread.job = job  # a sync handler runs on the thread that starts it

    def job_finished(self, job: Job, jobs_done: int) -> None:
        self.runtime.slot.job_finished(job.id, jobs_done)
        if self.runtime.current_job is job:
            self.runtime.current_job = None
        self._running.pop(job.id, None)
        if getattr(self._thread, "job", None) is job:
            self._thread.job = None

    def jobs_cleared(self, jobs: list[Job]) -> None:
        self.runtime.slot.jobs_cleared([job.id for job in jobs])

    def job_deadline(self, job: Job, deadline: float) -> None:
        self.runtime.slot.job_deadline(job.id, deadline)

    def database_unreachable(self, error: str) -> None:
        """Shown as the child's db_ok / error in status, and counted in
        pulse_workers_database_unreachable."""
        self.runtime.slot.update(message=error)
        self.runtime.title_detail = "no database"

    def database_reachable(self) -> None:
        self.runtime.slot.update(message="")
        log.info("worker %d reached the database again", self.runtime.ctx.index)

    def idle(self) -> None:
        state = ChildState.DRAINING if self.runtime.draining() else ChildState.IDLE
        self.runtime.slot.update(state=state)
        self.runtime.title_detail = "drained" if self.runtime.draining() else "idle"
        self.runtime.current_job = None

    def job_for_output(self) -> Job | None:
        """The job a printed line belongs to: this thread's, else the only
        job running (an async handler's, on the event loop's thread); None
        when several run and the line could be any one's."""
        job = getattr(self._thread, "job", None)
        # An async job is started on one thread and finished on another, so
        # a thread's own record may be stale: it counts while the job runs.
        if job is not None and job.id in self._running:
            return job
        running = list(self._running.values())  # one C-level copy under the GIL
        return running[0] if len(running) == 1 else None


def tag_job_output(status: BoardStatus) -> None:
    """Prefix what handlers print with their job (pulsed/output.py)."""
    sys.stdout = JobTaggedStream(sys.stdout, status.job_for_output)  # type: ignore[assignment]
    sys.stderr = JobTaggedStream(sys.stderr, status.job_for_output)  # type: ignore[assignment]


def worker_main(runtime: ChildRuntime) -> int:
    ctx = runtime.ctx
    end_descendants_with_worker()
    gc.set_threshold(WORKER_GC_THRESHOLD, *gc.get_threshold()[1:])
    try:
        import_handlers(ctx.config.worker.handlers, import_path(ctx.config))
    except BaseException as exc:  # noqa: BLE001 - any import failure is a boot error
        return boot_failed(runtime, f"importing handlers {list(ctx.config.worker.handlers)}", exc)
    worker_config = ctx.config.worker
    options = WorkerOptions(
        owner=worker_owner(ctx.config.daemon.node_id, ctx.index, os.getpid()),
        lease_ttl=worker_config.lease_ttl, poll_interval=worker_config.poll_interval,
        prefetch=worker_config.prefetch, concurrency=worker_config.concurrency, queues=tuple(worker_config.queues),
        aging=worker_config.aging, limits=type_limits(ctx.config),
        type_timeouts={name: t.timeout for name, t in ctx.config.types.items() if t.timeout},
        type_attempts={name: t.max_attempts for name, t in ctx.config.types.items()
                       if t.max_attempts},
        poison_after=worker_config.poison_after, sole_owner=True,
        max_result_bytes=worker_config.max_result_bytes,
        cancel_grace=worker_config.cancel_grace, node_id=ctx.config.daemon.node_id,
        pooler=ctx.config.database.pooler, listen_url=ctx.config.database.listen_url,
    )
    max_jobs = None
    if worker_config.max_jobs:
        max_jobs = int(worker_config.max_jobs * random.uniform(1, 1 + RECYCLE_JITTER))
    status = BoardStatus(runtime)
    tag_job_output(status)
    worker = Worker(ctx.dsn, options, status=status,  # issue 18: OpenTelemetry spans, if enabled
                    registry=traced_handlers(default_handlers, ctx.config, ctx.dsn))
    runtime.slot.update(state=ChildState.IDLE)
    runtime.title_detail = "idle"
    worker.run(should_stop=runtime.should_stop, paused=runtime.draining, max_jobs=max_jobs)
    if max_jobs is not None and worker.jobs_done >= max_jobs:
        runtime.recycle_requested = True
    return exit_code_for(runtime)
