"""What a scrape (GET /metrics) reads: every process's metric files merged,
and gauges of the present computed at scrape time from the status board,
/proc and the database."""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple

from pulsed.metrics import MAX_TYPE_LABELS, OTHER_TYPE

from pulsed.metrics_files import _UNREADABLE_FILE, _locked, _readable_values, multiproc_dir

log = logging.getLogger(__name__)

DB_SAMPLE_MIN_S = 1.0  # a scrape reuses a database sample younger than this
DB_COST_FACTOR = 50  # ... or younger than 50 times what taking it cost
WORKER_STATES = ("starting", "idle", "busy", "draining", "stopping", "boot_failed")
WORKER_STATES = ("starting", "idle", "busy", "draining", "stopping", "boot_failed")


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
        from pulsed.metrics import local_registry  # the process's own registry

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
        queues = _fewer_types(sample["queues"])
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
            for row in _fewer_types([{**r, "state": ""} for r in sample["unhandled"]]):
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


def _fewer_types(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows by (type, state) with the MAX_TYPE_LABELS types of most jobs by
    name and the rest summed as OTHER_TYPE (counts added, the oldest age
    kept): 20,000 types that no worker handles made 60,000 series."""
    totals: dict[str, int] = {}
    for row in rows:
        totals[row["type"]] = totals.get(row["type"], 0) + row["count"]
    if len(totals) <= MAX_TYPE_LABELS:
        return [dict(row) for row in rows]
    named = set(sorted(totals, key=lambda t: (-totals[t], t))[:MAX_TYPE_LABELS])
    kept: list[dict[str, Any]] = []
    other: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["type"] in named:
            kept.append(dict(row))
            continue
        merged = other.setdefault(row["state"], {**row, "type": OTHER_TYPE, "count": 0})
        merged["count"] += row["count"]
        if row.get("oldest_age_s") is not None:
            merged["oldest_age_s"] = max(merged.get("oldest_age_s") or 0.0, row["oldest_age_s"])
    return kept + list(other.values())


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
