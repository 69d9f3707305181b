"""Prometheus metrics, aggregated across every process of the daemon.

prometheus_client's multiprocess mode: each process writes its counters and
histograms into its own memory-mapped file in one directory, and a scrape
(the API child's GET /metrics) merges the files. The master calls
`setup_multiproc_dir()` before anything creates a metric, so every child it
forks inherits the directory; a child's first update after the fork opens its
own file, and each update after that is a store into that mapping.

Recycled workers would leave a file each behind (thousands of files make
scrapes take seconds), so when the master reaps a child, `child_reaped()`
folds that child's counts into one archive file per kind and deletes the
child's files, under an exclusive lock that scrapes share: a scrape never
sees a count twice or not at all, and the directory holds about two files
per live process plus the archives.

Gauges that describe the present (workers busy or idle, queue depth, the
leader) are not kept per process: a scrape computes them from the status
board and the database (`BoardCollector`, `DatabaseCollector`).

Nothing here imports prometheus_client until a metric is first used, so
`setup_multiproc_dir()` can come after `import pulsed`.

Hooks, one line each where the event is known:

    metrics.setup_multiproc_dir(state_dir)          master, once, before forking
    metrics.child_reaped(pid)                       master, each reaped pid
    metrics.child_restarted(role, reason)           master, an unplanned exit
    metrics.leases_released(released, how)          master, rows the store released
    metrics.leases_reaped(count)                    leader's reaper
    metrics.prepare()                               worker idle, master up, scheduler
    metrics.jobs_finished(reports)                 worker, for the jobs of a batch
    metrics.jobs_enqueued(job_type, source)         the HTTP API, cron
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from pulsed.errors import CHILD_BOOT_ERROR, CHILD_PARENT_GONE, CHILD_RECYCLE
from pulsed.metrics_files import (DIR_NAME, ENV, _locked, child_reaped,  # noqa: F401 (re-exported)
                                  compact_pid, forget_reaped, multiproc_dir, use_reserving_dict)

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0, 900.0, 3600.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                14400.0, 86400.0)
JOB_OUTCOMES = ("completed", "failed", "retried", "timed_out", "snoozed", "lost",
                "worker_died", "interrupted")

# The most distinct queue label values one process reports (each multiplies
# the job metrics' series); jobs of any further queue count as OTHER_QUEUE.
MAX_QUEUE_LABELS = 50
OTHER_QUEUE = "_other"
# The same for job types: any client with the API's token can send jobs of
# new types (20,000 of them made /metrics 1.4 MB, a second a scrape).
MAX_TYPE_LABELS = 200
OTHER_TYPE = "_other"
DEFAULT_QUEUE = "default"  # enqueue's (pulsed.api imports the store, which imports this)

_UNKNOWN: Any = object()
# A worker's report of a completion the lease fence refused (its lease was
# reaped or taken over): counted as "lost", never as "completed".
FENCED = "fenced"


# -- the metrics a process updates ---------------------------------------------


class _Metrics:
    """This process's metric objects, with their label children cached so a
    job's update is a dict lookup and a few stores into the mapped file."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        use_reserving_dict()

        # Multiprocess mode exposes through the files; the registry serves
        # a process that runs without the directory (run_worker, tests).
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Counter("pulse_jobs", "Job attempts that ended, by job type, outcome "
                            "(completed, failed, retried, timed_out, snoozed, lost, "
                            "worker_died, interrupted) and queue.", ["type", "outcome", "queue"],
                            registry=self.registry)
        self.enqueued = Counter("pulse_jobs_enqueued", "Jobs enqueued through the daemon "
                                "(source: http, cron); applications' own enqueues are not "
                                "counted here.", ["type", "source"], registry=self.registry)
        self.duration = Histogram("pulse_job_duration_seconds", "Time a job's handler ran.",
                                  ["type", "queue"], buckets=DURATION_BUCKETS,
                                  registry=self.registry)
        self.wait = Histogram("pulse_job_wait_seconds", "Time a job waited between being "
                              "due (run_at) and starting.", ["type", "queue"],
                              buckets=WAIT_BUCKETS, registry=self.registry)
        self.restarts = Counter("pulse_child_restarts", "Children that exited without being "
                                "asked to, by role and reason.", ["role", "reason"],
                                registry=self.registry)
        self.released = Counter("pulse_leases_released", "Job leases the master released "
                                "(its worker died, its job overran, a previous master died).",
                                ["reason"], registry=self.registry)
        self.reaped = Counter("pulse_leases_reaped", "Expired job leases the leader took back.",
                              registry=self.registry)
        self.poisoned = Counter("pulse_jobs_poisoned", "Jobs failed at once because "
                                "worker.poison_after attempts in a row ended worker_died or "
                                "timeout.", registry=self.registry)
        self._cache: dict[tuple[Any, ...], Any] = {}
        self._queues: set[str] = set()
        self._types: set[str] = set()

    def queue(self, name: str) -> str:
        """The queue label: the first MAX_QUEUE_LABELS queues by name, then
        OTHER_QUEUE, so queue names made up at run time cannot grow the
        series without bound."""
        return _bounded(self._queues, name, MAX_QUEUE_LABELS, OTHER_QUEUE)

    def job_type(self, name: str) -> str:
        """The type label: as queue()'s, MAX_TYPE_LABELS types, then OTHER_TYPE."""
        return _bounded(self._types, name, MAX_TYPE_LABELS, OTHER_TYPE)

    def child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = metric.labels(*labels)
        return found


def _bounded(seen: set[str], name: str, limit: int, other: str) -> str:
    if name in seen:
        return name
    if len(seen) < limit:
        seen.add(name)
        return name
    return other


_metrics: _Metrics | None = None
_metrics_lock = threading.Lock()  # workers may run jobs on threads


def _m() -> _Metrics:
    global _metrics
    if _metrics is None:
        with _metrics_lock:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


def prepare() -> None:
    """Build this process's metric objects now (importing
    prometheus_client), not at their first update: a worker while idle,
    the master once the node is up, the scheduler between polls. Only a
    warm-up: a failure (its metrics directory gone, say) is logged, and
    the first update meets it again."""
    try:
        _m()
    except Exception as exc:  # noqa: BLE001
        log.warning("could not set up this process's metrics yet: %s", exc)


def local_registry() -> Any:
    """The registry of this process's own metrics (meaningful without a
    multiprocess directory: in-process workers, tests)."""
    return _m().registry


# -- hooks ----------------------------------------------------------------------

DROPPED_LOG_EVERY_S = 60.0
_dropped_logged_at: float | None = None
_Hook = TypeVar("_Hook", bound=Callable[..., None])


def _best_effort(hook: _Hook) -> _Hook:
    """A metric update must never cost a job, a completion or a process:
    the hooks run in the worker's completion path, inside store
    transactions and in the master's loop, and a metric file that cannot
    be made or grown (the state dir full, read-only or removed) raised
    there. Such an update is dropped; a warning says so, once a minute."""
    @functools.wraps(hook)
    def guarded(*args: Any, **kwargs: Any) -> None:
        try:
            hook(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            global _dropped_logged_at
            now = time.monotonic()
            if _dropped_logged_at is None or now - _dropped_logged_at >= DROPPED_LOG_EVERY_S:
                _dropped_logged_at = now
                log.warning("metrics: dropping updates (%s): %s: %s; jobs are not affected",
                            hook.__name__, type(exc).__name__, exc)
    return guarded  # type: ignore[return-value]


class JobReport(NamedTuple):
    """One finished attempt, as a worker reports it (metrics, log line)."""

    job: Any
    outcome: str  # the attempt's: completed, error, timeout, snoozed
    duration_s: float
    state: Any = _UNKNOWN  # the job state its failure write returned (None: lease lost)
    ended_at: float = 0.0  # time.time() when the handler returned
    error: str | None = None  # a failed attempt's "Class: message", for its log line


def job_finished(job: Any, outcome: str, duration_s: float, state: Any = _UNKNOWN) -> None:
    """A worker ran `job` for `duration_s`; `outcome` is the attempt's
    (completed, error, timeout, snoozed) and `state` the job state its
    failure write returned (None: the lease was lost). Without `state`, an
    error counts as failed once attempts are used up, else as retried."""
    jobs_finished([JobReport(job, outcome, duration_s, state, time.time())])


@_best_effort
def jobs_finished(reports: Sequence[JobReport]) -> None:
    """job_finished() for many attempts at once: counted here first, then
    one store per counter and histogram bucket touched, not ~6 per job."""
    counts: dict[tuple[str, str, str], int] = {}
    durations: dict[tuple[str, str], list[float]] = {}
    waits: dict[tuple[str, str], list[float]] = {}
    for report in reports:
        job = report.job
        where = (job.type, getattr(job, "queue", DEFAULT_QUEUE))
        key = (*where, outcome_label(report.outcome, report.state, job))
        counts[key] = counts.get(key, 0) + 1
        durations.setdefault(where, []).append(report.duration_s)
        run_at = getattr(job, "run_at", None)
        started_at = getattr(job, "started_at", None)
        if run_at is not None:
            # A claimed job's start is the database's, as its run_at: the
            # host's wall clock may be minutes off (a wait of 600 s per job,
            # or none). A Job made by hand has only the host's time.
            waited = ((started_at - run_at).total_seconds() if started_at is not None
                      else report.ended_at - report.duration_s - run_at.timestamp())
            waits.setdefault(where, []).append(waited if waited > 0 else 0.0)
    m = _m()
    for (job_type, queue, label), count in counts.items():
        m.child(m.jobs, m.job_type(job_type), label, m.queue(queue)).inc(count)
    for (job_type, queue), values in durations.items():
        _observe_many(m.child(m.duration, m.job_type(job_type), m.queue(queue)), values)
    for (job_type, queue), values in waits.items():
        _observe_many(m.child(m.wait, m.job_type(job_type), m.queue(queue)), values)


def _observe_many(histogram: Any, values: Sequence[float]) -> None:
    """Histogram.observe() for each value, with one store per bucket
    touched. Uses the histogram's bucket values (prometheus_client has no
    public batch observe); falls back to observe() if they are not there."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    per_bucket: dict[int, int] = {}
    for value in values:
        index = bisect.bisect_left(bounds, value)  # the first bound >= value, as observe()
        per_bucket[index] = per_bucket.get(index, 0) + 1
    total.inc(math.fsum(values))
    for index, count in per_bucket.items():
        if index < len(buckets):
            buckets[index].inc(count)


def outcome_label(outcome: str, state: Any = _UNKNOWN, job: Any = None) -> str:
    """The pulse_jobs_total outcome of an attempt."""
    if outcome == FENCED:
        return "lost"
    if outcome in ("completed", "snoozed", "worker_died", "interrupted"):
        return outcome
    if outcome == "timeout":
        return "timed_out"
    if state is _UNKNOWN:
        spent = job is not None and job.attempt >= job.max_attempts
        return "failed" if spent else "retried"
    if state is None:
        return "lost"
    return "failed" if getattr(state, "value", state) == "failed" else "retried"


@_best_effort
def jobs_enqueued(job_type: str, source: str, count: int = 1) -> None:
    m = _m()
    m.child(m.enqueued, m.job_type(job_type), source).inc(count)


@_best_effort
def child_restarted(role: str, reason: str) -> None:
    m = _m()
    m.child(m.restarts, role, reason).inc()


def restart_reason(code: int, kill_reason: str | None = None) -> str:
    """Why a child exited, from its exit code (negative: the signal) and the
    master's reason for killing it, if it did."""
    if kill_reason:
        return kill_reason  # timeout, heartbeat
    reasons = {CHILD_RECYCLE: "recycle", CHILD_BOOT_ERROR: "boot_error",
               CHILD_PARENT_GONE: "parent_gone"}
    if code in reasons:
        return reasons[code]
    return "killed" if code < 0 else "exited"


@_best_effort
def leases_released(released: Sequence[Mapping[str, Any]] | int, how: str) -> None:
    """The master released leases (`how`: the attempt outcome it recorded,
    e.g. worker_died or timeout). Given the store's rows (with `type`), each
    also counts as that job's outcome."""
    m = _m()
    count = released if isinstance(released, int) else len(released)
    if count:
        m.child(m.released, how).inc(count)
    if not isinstance(released, int) and how in ("worker_died", "timeout", "interrupted"):
        label = outcome_label(how)
        for row in released:
            if row.get("type"):
                m.child(m.jobs, m.job_type(row["type"]), label,
                        m.queue(row.get("queue") or DEFAULT_QUEUE)).inc()


@_best_effort
def jobs_poisoned(count: int) -> None:
    if count:
        _m().poisoned.inc(count)


@_best_effort
def leases_reaped(count: int) -> None:
    if count:
        _m().reaped.inc(count)


# -- the directory ----------------------------------------------------------------


def setup_multiproc_dir(state_dir: Path | str) -> Path:
    """Make `<state_dir>/metrics` fresh and empty and put this process (and
    the children it forks) in multiprocess mode. Call it in the master
    after it knows no other pulsed uses the state directory, before forking."""
    global _metrics
    path = Path(state_dir) / DIR_NAME
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            continue  # nothing of ours; leave it
        entry.unlink(missing_ok=True)
    os.environ[ENV] = str(path)
    values = sys.modules.get("prometheus_client.values")
    if values is not None and not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # imported before us: switch now
    _metrics = None  # metrics made from here on write to the directory
    forget_reaped()
    return path


# The scrape side lives in its own module; pulsed.metrics is the path
# callers use. metrics_scrape imports this module only inside a function,
# so importing it last here is safe.
from pulsed.metrics_scrape import (BoardCollector, BuildInfoCollector,  # noqa: E402,F401
                                   ChildProcessCollector, DatabaseCollector, LocalCollector,
                                   ProcessFilesCollector, ProcStats, exposition_registry,
                                   proc_stats)
