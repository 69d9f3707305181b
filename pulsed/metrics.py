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
    metrics.jobs_finished(reports)                 worker, for the jobs of a batch
    metrics.jobs_enqueued(job_type, source)         the HTTP API, cron
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import glob
import logging
import math
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple

from pulsed.errors import CHILD_BOOT_ERROR, CHILD_PARENT_GONE, CHILD_RECYCLE

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
DIR_NAME = "metrics"  # under the state directory
LOCK_NAME = ".lock"  # scrapes hold it shared, compaction exclusive (not *.db)
ARCHIVE = "archive"  # the "pid" part of the archive files' names
ADDITIVE_KINDS = ("counter", "histogram", "summary")  # what the archive keeps
LOCK_WAIT_S = 0.2  # the most a reap waits for scrapes in progress
LOCK_POLL_S = 0.005
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0, 900.0, 3600.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                14400.0, 86400.0)
DB_SAMPLE_MIN_S = 1.0  # a scrape reuses a database sample younger than this
DB_COST_FACTOR = 50  # ... or younger than 50 times what taking it cost
WORKER_STATES = ("starting", "idle", "busy", "draining", "stopping", "boot_failed")
JOB_OUTCOMES = ("completed", "failed", "retried", "timed_out", "snoozed", "lost",
                "worker_died", "interrupted")

# The most distinct queue label values one process reports (each multiplies
# the job metrics' series); jobs of any further queue count as OTHER_QUEUE.
MAX_QUEUE_LABELS = 50
OTHER_QUEUE = "_other"
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

    def queue(self, name: str) -> str:
        """The queue label: the first MAX_QUEUE_LABELS queues by name, then
        OTHER_QUEUE, so queue names made up at run time cannot grow the
        series without bound."""
        if name in self._queues:
            return name
        if len(self._queues) < MAX_QUEUE_LABELS:
            self._queues.add(name)
            return name
        return OTHER_QUEUE

    def child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = metric.labels(*labels)
        return found


_metrics: _Metrics | None = None
_metrics_lock = threading.Lock()  # workers may run jobs on threads


def _m() -> _Metrics:
    global _metrics
    if _metrics is None:
        with _metrics_lock:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


def local_registry() -> Any:
    """The registry of this process's own metrics (meaningful without a
    multiprocess directory: in-process workers, tests)."""
    return _m().registry


# -- hooks ----------------------------------------------------------------------


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
        if run_at is not None:
            waited = report.ended_at - report.duration_s - run_at.timestamp()
            waits.setdefault(where, []).append(waited if waited > 0 else 0.0)
    m = _m()
    for (job_type, queue, label), count in counts.items():
        m.child(m.jobs, job_type, label, m.queue(queue)).inc(count)
    for (job_type, queue), values in durations.items():
        _observe_many(m.child(m.duration, job_type, m.queue(queue)), values)
    for (job_type, queue), values in waits.items():
        _observe_many(m.child(m.wait, job_type, m.queue(queue)), values)


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


def jobs_enqueued(job_type: str, source: str, count: int = 1) -> None:
    m = _m()
    m.child(m.enqueued, job_type, source).inc(count)


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
                m.child(m.jobs, row["type"], label, m.queue(row.get("queue") or DEFAULT_QUEUE)).inc()


def jobs_poisoned(count: int) -> None:
    if count:
        _m().poisoned.inc(count)


def leases_reaped(count: int) -> None:
    if count:
        _m().reaped.inc(count)


# -- the directory ----------------------------------------------------------------


def multiproc_dir() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


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
    _pending.clear()
    return path


_pending: set[int] = set()


def child_reaped(pid: int) -> None:
    """The master reaped `pid`: fold its counters into the archive and
    delete its files. If scrapes hold the lock for long, the pid waits for
    the next reap."""
    path = multiproc_dir()
    if path is None:
        return
    _pending.add(pid)
    try:
        with _locked(path, exclusive=True, wait=LOCK_WAIT_S) as locked:
            if not locked:
                log.debug("metrics: scrapes in progress; pid(s) %s compacted later",
                          sorted(_pending))
                return
            for dead in sorted(_pending):
                if not _is_our_child(dead):  # a child reusing the pid keeps its file
                    compact_pid(path, dead)
            _pending.clear()
    except OSError as exc:
        log.warning("metrics: could not compact the files of pid %d: %s", pid, exc)


def compact_pid(path: Path, pid: int) -> None:
    """Add a dead process's counters, histograms and summaries into the
    archive files and remove all its files. Call with the lock held."""
    from prometheus_client.mmap_dict import MmapedDict

    for name in sorted(glob.glob(str(path / f"*_{pid}.db"))):
        kind = os.path.basename(name).split("_")[0]
        if kind in ADDITIVE_KINDS:
            archive = MmapedDict(str(path / f"{kind}_{ARCHIVE}.db"))
            try:
                for key, value, _ts, _pos in _readable_values(name):
                    old, _ = archive.read_value(key)
                    archive.write_value(key, old + value, 0.0)
            finally:
                archive.close()
        os.unlink(name)  # gauges: live ones die with the process (mark_process_dead)


# What reading a metric file may raise: a damaged file, or one a process
# is creating at that moment (still empty: struct.error on its header).
_UNREADABLE_FILE = (RuntimeError, ValueError, UnicodeDecodeError, OSError, struct.error)


def _readable_values(name: str) -> list[tuple[str, float, float, int]]:
    from prometheus_client.mmap_dict import MmapedDict

    try:
        return list(MmapedDict.read_all_values_from_file(name))
    except _UNREADABLE_FILE as exc:
        log.warning("metrics: %s is unreadable (%s); its counts are dropped", name, exc)
        return []


def _is_our_child(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] != "Z" and int(fields[1]) == os.getpid()


@contextlib.contextmanager
def _locked(path: Path, *, exclusive: bool, wait: float | None = None) -> Iterator[bool]:
    """flock the directory's lock file (shared or exclusive); with `wait`,
    give up after that long and yield False."""
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        yield _flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, wait)
    finally:
        os.close(fd)  # closing releases the lock


def _flock(fd: int, mode: int, wait: float | None) -> bool:
    if wait is None:
        fcntl.flock(fd, mode)
        return True
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(LOCK_POLL_S)


# -- collectors a scrape uses -------------------------------------------------------


class ProcessFilesCollector:
    """Every process's metrics from the directory, merged under the shared
    lock (so a compaction is seen whole or not at all)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def collect(self) -> Iterable[Any]:
        from prometheus_client.metrics_core import GaugeMetricFamily
        from prometheus_client.multiprocess import MultiProcessCollector

        with _locked(self.path, exclusive=False):
            files = sorted(glob.glob(str(self.path / "*.db")))
            try:
                merged = list(MultiProcessCollector.merge(files, accumulate=True))
            except _UNREADABLE_FILE:
                files = [f for f in files if _readable_values(f)]
                merged = list(MultiProcessCollector.merge(files, accumulate=True))
        yield from merged
        yield GaugeMetricFamily("pulse_metrics_files", "Per-process metric files merged by "
                                "this scrape.", value=len(files))


class LocalCollector:
    """This process's metrics, when there is no multiprocess directory."""

    def collect(self) -> Iterable[Any]:
        yield from local_registry().collect()


class BoardCollector:
    """Workers by state, read from the master's status board at scrape time."""

    def __init__(self, board: Any) -> None:
        self.board = board

    def collect(self) -> Iterable[Any]:
        from prometheus_client.metrics_core import GaugeMetricFamily

        counts = dict.fromkeys(WORKER_STATES, 0)
        cut_off = 0
        for view in self.board.used_slots():
            if view.role == "worker":
                name = view.state.name.lower()
                counts[name] = counts.get(name, 0) + 1
                cut_off += bool(view.database_error)
        family = GaugeMetricFamily("pulse_workers", "Worker processes on this node by state.",
                                   labels=["state"])
        for state, count in counts.items():
            family.add_metric([state], count)
        yield family
        yield GaugeMetricFamily("pulse_workers_database_unreachable", "Worker processes on "
                                "this node that have not reached the database for a while "
                                "(they claim nothing until they do).", value=cut_off)


class BuildInfoCollector:
    """pulse_build_info: 1, with the running version (and Python's) as labels."""

    def collect(self) -> Iterable[Any]:
        import platform

        from prometheus_client.metrics_core import GaugeMetricFamily

        import pulsed

        family = GaugeMetricFamily("pulse_build_info", "The running Pulse's version (value 1).",
                                   labels=["version", "python"])
        family.add_metric([pulsed.__version__, platform.python_version()], 1)
        yield family


class ChildProcessCollector:
    """process_* for the master and every child on the board (role and index
    as labels), read from /proc by pid at scrape time: prometheus_client's
    own process collector sees only the process that serves the scrape."""

    def __init__(self, board: Any, master_pid: int | None) -> None:
        self.board = board
        self.master_pid = master_pid

    def collect(self) -> Iterable[Any]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        labels = ["role", "index"]
        cpu = CounterMetricFamily("process_cpu_seconds", "User and system CPU time the "
                                  "process spent, in seconds.", labels=labels)
        rss = GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in "
                                "bytes.", labels=labels)
        vms = GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                                labels=labels)
        start = GaugeMetricFamily("process_start_time_seconds", "Start time of the process "
                                  "since the Unix epoch, in seconds.", labels=labels)
        fds = GaugeMetricFamily("process_open_fds", "Open file descriptors.", labels=labels)
        for (role, index), found in self._places().items():
            where = [role, str(index)]
            cpu.add_metric(where, found.cpu_s)
            rss.add_metric(where, found.rss_bytes)
            vms.add_metric(where, found.vms_bytes)
            start.add_metric(where, found.start_time_s)
            if found.open_fds is not None:
                fds.add_metric(where, found.open_fds)
        yield from (cpu, rss, vms, start, fds)

    def _places(self) -> dict[tuple[str, int], ProcStats]:
        """Each (role, index) place's processes, added up: during a reload or
        a restart the leaving child and its successor share a place (one
        series each, with no pid label to churn through; start time: the
        newest)."""
        places: dict[tuple[str, int], ProcStats] = {}
        for role, index, pid in self._processes():
            found = proc_stats(pid)
            if found is None:
                continue  # it exited since the board was read
            other = places.get((role, index))
            places[(role, index)] = found if other is None else ProcStats(
                other.cpu_s + found.cpu_s, other.rss_bytes + found.rss_bytes,
                other.vms_bytes + found.vms_bytes, max(other.start_time_s, found.start_time_s),
                None if other.open_fds is None or found.open_fds is None
                else other.open_fds + found.open_fds)
        return places

    def _processes(self) -> list[tuple[str, int, int]]:
        found = [("master", 0, self.master_pid)] if self.master_pid else []
        return found + [(v.role, v.index, v.pid) for v in self.board.used_slots()]


class ProcStats(NamedTuple):
    cpu_s: float
    rss_bytes: int
    vms_bytes: int
    start_time_s: float
    open_fds: int | None  # None: not ours to list


def proc_stats(pid: int) -> ProcStats | None:
    """A process's CPU, memory and start time from /proc/PID/stat (None if
    it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    # fields[0] is stat's 3rd field (state): utime is the 14th, stime 15th,
    # starttime 22nd, vsize 23rd, rss (pages) 24th
    try:
        fds: int | None = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = None
    return ProcStats(cpu_s=(int(fields[11]) + int(fields[12])) / ticks,
                     rss_bytes=int(fields[21]) * os.sysconf("SC_PAGE_SIZE"),
                     vms_bytes=int(fields[20]), start_time_s=_boot_time() + int(fields[19]) / ticks,
                     open_fds=fds)


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


class DatabaseCollector:
    """Queue depth, the oldest jobs' age and the leader, from the database at
    scrape time. `connect()` gives a connection context (a pool's). Counting
    a large backlog is a scan, so a sample is reused until DB_COST_FACTOR
    times what it took has passed (at least DB_SAMPLE_MIN_S): scrapes never
    cost the database more than a few percent, however often they come."""

    def __init__(self, connect: Callable[[], AbstractContextManager[Any]], node_id: str) -> None:
        self.connect = connect
        self.node_id = node_id
        self._lock = threading.Lock()  # scrapes come on several threads
        self._sample: dict[str, Any] | None = None
        self._due = 0.0

    def collect(self) -> Iterable[Any]:
        import psycopg
        from prometheus_client.metrics_core import GaugeMetricFamily

        try:
            sample = self._read()
        except psycopg.Error as exc:
            log.warning("metrics: the database did not answer the scrape: %s", exc)
            yield GaugeMetricFamily("pulse_database_up", _DB_UP_HELP, value=0)
            return
        yield GaugeMetricFamily("pulse_database_up", _DB_UP_HELP, value=1)
        queues = sample["queues"]
        yield _labelled(GaugeMetricFamily, "pulse_queue_depth", "Unfinished jobs (and failed "
                        "ones kept for inspection) by type and state.",
                        ((r["type"], r["state"], r["count"]) for r in queues))
        if sample["with_ages"]:
            yield _labelled(GaugeMetricFamily, "pulse_queue_oldest_job_age_seconds",
                            "Age of the oldest job by type and state (available: since it "
                            "was due; running: since it started; else since it was created).",
                            ((r["type"], r["state"], max(0.0, r["oldest_age_s"] or 0.0))
                             for r in queues))
        if sample.get("unhandled") is not None:
            unhandled = GaugeMetricFamily("pulse_jobs_unhandled", "Waiting jobs (available, "
                                          "scheduled, retryable) of types no live worker "
                                          "handles, by type.", labels=["type"])
            for row in sample["unhandled"]:
                unhandled.add_metric([row["type"]], row["count"])
            yield unhandled
        yield GaugeMetricFamily("pulse_queue_oldest_available_age_seconds", "How long the "
                                "oldest available job has waited since it was due (0: none "
                                "waits).", value=max(0.0, sample["oldest"] or 0.0))
        yield from _leader_families(GaugeMetricFamily, sample["leader"], self.node_id)

    def _read(self) -> dict[str, Any]:
        with self._lock:
            if self._sample is None or time.monotonic() >= self._due:
                started = time.monotonic()
                self._sample = self._query()
                cost = time.monotonic() - started
                self._due = time.monotonic() + max(DB_SAMPLE_MIN_S, cost * DB_COST_FACTOR)
            return self._sample

    def _query(self) -> dict[str, Any]:
        from pulsed.db.store import Store

        with self.connect() as conn:
            store = Store(conn)
            with_ages = hasattr(store, "queue_ages")
            queues = store.queue_ages() if with_ages else store.queue_depths()
            unhandled = (store.unhandled_types(queues) if hasattr(store, "unhandled_types")
                         else None)
            return {"queues": queues, "with_ages": with_ages, "unhandled": unhandled,
                    "oldest": store.oldest_available_age(), "leader": store.leader_get()}


_DB_UP_HELP = "1 when the database answered this scrape's queries."


def _labelled(family_class: Any, name: str, help_text: str,
              rows: Iterable[tuple[str, str, float]]) -> Any:
    family = family_class(name, help_text, labels=["type", "state"])
    for job_type, state, value in rows:
        family.add_metric([job_type, state], value)
    return family


def _leader_families(family_class: Any, row: Mapping[str, Any] | None,
                     node_id: str) -> Iterator[Any]:
    live = bool(row and row["live"])
    local = live and row is not None and row["leader_id"].rsplit("/", 1)[0] == node_id
    yield family_class("pulse_leader_elected", "1 when some scheduler holds the leader lease.",
                       value=int(live))
    yield family_class("pulse_leader_is_local", "1 when this node's scheduler is the leader.",
                       value=int(local))
    yield family_class("pulse_leader_term", "The leader lease's term (grows with each new "
                       "leader).", value=row["term"] if row else 0)


def exposition_registry(*, connect: Callable[[], AbstractContextManager[Any]] | None = None,
                        node_id: str = "", board: Any = None,
                        master_pid: int | None = None) -> Any:
    """A registry for GET /metrics: every process's metrics, plus what a
    scrape reads from the board (and /proc for its processes: the master's
    with master_pid) and the database."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    path = multiproc_dir()
    registry.register(ProcessFilesCollector(path) if path is not None else LocalCollector())
    registry.register(BuildInfoCollector())
    if board is not None:
        registry.register(BoardCollector(board))
        registry.register(ChildProcessCollector(board, master_pid))
    if connect is not None:
        registry.register(DatabaseCollector(connect, node_id))
    return registry
