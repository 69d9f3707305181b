"""What every fault test needs: load, a ledger of what happened to each job,
a watch on the daemon while the fault lasts, and the results row.

Definitions (docs/chaos.md uses the same):
    lost        a job of the load that is gone, or ended failed/cancelled
                although every handler run could succeed
    stuck       a job still not finished (running, available, retryable)
                once the settle time (lease TTL plus a margin) has passed
    duplicates  handler runs that reached 'done' beyond the first, summed
                over completed jobs (at-least-once delivery makes them
                possible; the table shows how many each fault causes)
    recovery    from the end of the fault (server back, link up, daemon
                killed) to the next completion, or as the test says
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import psycopg
from psycopg.conninfo import make_conninfo

import pulsed
from pulsed.db.migrate import migrate
from tests.pg import wait_until

RESULTS_ENV = "PULSE_CHAOS_RESULTS"
FINISHED = ("completed", "failed", "cancelled")
# `id = ANY(%s)` with a 100k-element parameter is a linear search per row;
# a semi-join on the unnested array is a hash join.
IN_IDS = "id IN (SELECT unnest(%s::bigint[]))"


# -- talking to a database that may be down -------------------------------------------------


def query(dsn: str, sql: str, params: Any = None, *, timeout: float = 5) -> list[tuple] | None:
    """Run one statement on a fresh connection; None if the server is not
    answering (the observer must not fail because the fault is on)."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, int(timeout)),
                             application_name="chaos observer") as conn:
            return conn.execute(sql, params).fetchall()
    except psycopg.OperationalError:
        return None


def completed_count(dsn: str, ids: list[int]) -> int | None:
    rows = query(dsn, f"SELECT count(*) FROM pulse_jobs WHERE {IN_IDS} AND state = 'completed'",
                 (ids,))
    return rows[0][0] if rows else None


def enqueue_load(dsn: str, count: int, job_type: str = "work", batch: int = 500,
                 **payload: Any) -> list[int]:
    """Enqueue `count` jobs of `job_type` up front; their ids."""
    ids: list[int] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        while len(ids) < count:
            n = min(batch, count - len(ids))
            with conn.transaction():
                ids += pulsed.enqueue_many(conn, [{"type": job_type, "payload": payload}] * n)
    return ids


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


# -- steady load ------------------------------------------------------------------------------


class Feeder(threading.Thread):
    """Enqueues `rate` jobs a second (in batches every `tick` s) until
    stopped; the ids of committed batches are kept. Use it on a server the
    fault leaves alone: a commit lost in the fault would be ambiguous."""

    def __init__(self, dsn: str, rate: float, *, job_type: str = "work", tick: float = 0.1,
                 **payload: Any) -> None:
        super().__init__(name="chaos-feeder", daemon=True)
        self.dsn, self.rate, self.tick = dsn, rate, tick
        self.job_type, self.payload = job_type, payload
        self.ids: list[int] = []
        self.errors: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        with psycopg.connect(self.dsn, autocommit=True, application_name="chaos feeder") as conn:
            while not self._halt.is_set():
                due = int((time.monotonic() - started) * self.rate) - len(self.ids)
                if due > 0:
                    try:
                        with conn.transaction():
                            self.ids += pulsed.enqueue_many(
                                conn, [{"type": self.job_type, "payload": self.payload}] * due)
                    except psycopg.Error as exc:  # noqa: PERF203
                        self.errors.append(str(exc))
                        return
                self._halt.wait(self.tick)

    def stop(self) -> list[int]:
        self._halt.set()
        self.join(timeout=10)
        assert not self.errors, f"the feeder failed: {self.errors}"
        return list(self.ids)


class BacklogKeeper(threading.Thread):
    """Keeps at least `low` jobs available (topping up `batch` at a time),
    so the workers are saturated whatever the machine's speed today."""

    def __init__(self, dsn: str, low: int, batch: int, *, job_type: str = "work",
                 **payload: Any) -> None:
        super().__init__(name="chaos-backlog", daemon=True)
        self.dsn, self.low, self.batch = dsn, low, batch
        self.job_type, self.payload = job_type, payload
        self.ids: list[int] = []
        self.errors: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, application_name="chaos backlog") as conn:
            while not self._halt.is_set():
                try:
                    waiting = conn.execute("SELECT count(*) FROM pulse_jobs "
                                           "WHERE state = 'available'").fetchone()[0]
                    if waiting < self.low:
                        with conn.transaction():
                            self.ids += pulsed.enqueue_many(conn, [
                                {"type": self.job_type, "payload": self.payload}] * self.batch)
                        continue
                except psycopg.Error as exc:
                    self.errors.append(str(exc))
                    return
                self._halt.wait(0.1)

    def stop(self) -> list[int]:
        self._halt.set()
        self.join(timeout=30)
        assert not self.errors, f"the backlog keeper failed: {self.errors}"
        return list(self.ids)


# -- the ledger -----------------------------------------------------------------------------------


@dataclass
class Accounting:
    total: int
    completed: int
    lost: int
    stuck: int
    duplicates: int
    phantom: int  # completed without any handler run reaching 'done'
    states: dict[str, int]
    lost_ids: list[int] = field(default_factory=list)
    stuck_ids: list[int] = field(default_factory=list)
    duplicate_ids: list[int] = field(default_factory=list)


def done_marks(marks: Path) -> Counter[int]:
    """Handler runs that reached 'done', per job id."""
    return Counter(int(p.name.split(".", 1)[0]) for p in marks.glob("*.done"))


def account(dsn: str, ids: list[int], marks: Path | None) -> Accounting:
    rows = query(dsn, f"SELECT id, state::text FROM pulse_jobs WHERE {IN_IDS}", (ids,))
    assert rows is not None, "the database is not answering for the final accounting"
    state_of = dict(rows)
    states = Counter(state_of.values())
    lost_ids = sorted(i for i in ids if state_of.get(i) in (None, "failed", "cancelled"))
    stuck_ids = sorted(i for i in ids if state_of.get(i) not in (None, *FINISHED))
    completed = [i for i in ids if state_of.get(i) == "completed"]
    runs = done_marks(marks) if marks is not None else Counter()
    duplicate_ids = sorted(i for i in completed if runs[i] > 1)
    return Accounting(
        total=len(ids), completed=len(completed), lost=len(lost_ids), stuck=len(stuck_ids),
        duplicates=sum(runs[i] - 1 for i in duplicate_ids),
        phantom=sum(1 for i in completed if marks is not None and runs[i] == 0),
        states=dict(states), lost_ids=lost_ids[:20], stuck_ids=stuck_ids[:20],
        duplicate_ids=duplicate_ids[:20])


def settle(dsn: str, ids: list[int], timeout: float, *, message: str = "") -> float:
    """Wait until every job is finished (or the timeout passes: the
    accounting then shows what is stuck); the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        rows = query(dsn, f"SELECT count(*) FROM pulse_jobs WHERE {IN_IDS} AND state = ANY(%s)",
                     (ids, list(FINISHED)))
        if rows and rows[0][0] == len(ids):
            break
        time.sleep(0.1)
    return time.monotonic() - started


def first_completion_after(dsn: str, ids: list[int], moment: datetime) -> float | None:
    """Seconds from `moment` to the first completion of one of `ids` after it."""
    rows = query(dsn, f"SELECT min(finished_at) FROM pulse_jobs WHERE {IN_IDS} "
                      "AND state = 'completed' AND finished_at >= %s", (ids, moment))
    if not rows or rows[0][0] is None:
        return None
    return (rows[0][0] - moment).total_seconds()


def completion_gaps(dsn: str, ids: list[int], start: datetime, end: datetime) -> float:
    """The longest stretch without a completion between start and end."""
    rows = query(dsn, f"SELECT finished_at FROM pulse_jobs WHERE {IN_IDS} AND state = "
                      "'completed' AND finished_at BETWEEN %s AND %s ORDER BY finished_at",
                 (ids, start, end))
    times = [start] + [r[0] for r in rows or []] + [end]
    return max((b - a).total_seconds() for a, b in zip(times, times[1:]))


def completions_between(dsn: str, ids: list[int], start: datetime, end: datetime) -> int:
    rows = query(dsn, f"SELECT count(*) FROM pulse_jobs WHERE {IN_IDS} AND state = "
                      "'completed' AND finished_at BETWEEN %s AND %s", (ids, start, end))
    return rows[0][0] if rows else 0


# -- watching the daemon -------------------------------------------------------------------------


class StatusWatch(threading.Thread):
    """Polls a daemon's status() while the fault lasts: is it answering,
    how fast, is the master the same process, how often did children
    restart."""

    def __init__(self, daemon: Any, interval: float = 0.25) -> None:
        super().__init__(name="chaos-status-watch", daemon=True)
        self.daemon, self.interval = daemon, interval
        self.polls = 0
        self.failures: list[str] = []
        self.slowest = 0.0
        self.master_pids: set[int] = set()
        self.restarts: dict[str, int] = {}
        self.states: Counter[str] = Counter()
        self.last: dict[str, Any] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            started = time.monotonic()
            try:
                status = self.daemon.status()
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                self.failures.append(f"{type(exc).__name__}: {exc}")
            else:
                self.last = status
                self.master_pids.add(status["master"]["pid"])
                for child in status["children"]:
                    key = f"{child['role']}-{child['index']}"
                    self.restarts[key] = max(self.restarts.get(key, 0), child["restarts"])
                    self.states[child["state"]] += 1
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.polls += 1
            self._halt.wait(self.interval)

    def stop(self) -> "StatusWatch":
        self._halt.set()
        self.join(timeout=15)
        return self

    @property
    def total_restarts(self) -> int:
        return sum(self.restarts.values())


def assert_daemon_healthy(daemon: Any, watch: StatusWatch, *, max_restarts: int = 0) -> None:
    """The master stayed up (one pid, still alive) and answered every
    status poll; children restarted at most max_restarts times in all."""
    from tests.system.daemon import pid_alive
    assert pid_alive(daemon.pid), f"the master died; log:\n{daemon.log_tail()}"
    assert watch.master_pids <= {daemon.pid}, f"the master changed: {watch.master_pids}"
    assert not watch.failures, (f"status did not answer {len(watch.failures)}/{watch.polls} "
                                f"times: {watch.failures[:3]}")
    assert watch.total_restarts <= max_restarts, (
        f"children restarted {watch.restarts} (at most {max_restarts} allowed): they should "
        f"reconnect, not crash; log:\n{crash_lines(daemon)}")


def crash_lines(daemon: Any, limit: int = 30) -> str:
    """The log lines that tell why children died."""
    keep = [line for line in daemon.log_text().splitlines()
            if "Traceback" in line or "Error" in line or "restarts in" in line
            or "exited with" in line or "killed by" in line]
    return "\n".join(keep[-limit:])


def log_count(path: Path, pattern: str, start: float, end: float, *, utc: bool = False) -> int:
    """Lines containing `pattern` in a log, stamped between two wall clock
    times (lines begin with a timestamp: pulsed's local asctime, or
    PostgreSQL's %m with log_timezone UTC)."""
    return sum(1 for line in path.read_text(errors="replace").splitlines()
               if pattern in line and _line_time(line, start, end, utc))


def log_rate(path: Path, pattern: str, start: float, end: float, *, utc: bool = False) -> float:
    """log_count() per second."""
    return log_count(path, pattern, start, end, utc=utc) / max(end - start, 1e-6)


def _line_time(line: str, start: float, end: float, utc: bool) -> bool:
    stamp = line[:23]
    for fmt in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%d %H:%M:%S,%f"):
        try:
            parsed = datetime.strptime(stamp, fmt)
        except ValueError:
            continue
        moment = (parsed.replace(tzinfo=timezone.utc) if utc else parsed).timestamp()
        return start <= moment <= end
    return False


# -- the results row --------------------------------------------------------------------------


def record_result(*, fault: str, load: str, lost: int, stuck: int, duplicates: int,
                  recovery_s: float | None, **extra: Any) -> dict[str, Any]:
    """Print one row of the results table and append it to
    $PULSE_CHAOS_RESULTS (a JSON-lines file) when that is set."""
    row = {"fault": fault, "load": load, "lost": lost, "stuck": stuck,
           "duplicates": duplicates,
           "recovery_s": None if recovery_s is None else round(recovery_s, 3), **extra}
    line = json.dumps(row, default=str)
    print(f"\nCHAOS-RESULT {line}", flush=True)
    if path := os.environ.get(RESULTS_ENV):
        with open(path, "a") as file:
            file.write(line + "\n")
    return row


def accounting_fields(acc: Accounting) -> dict[str, Any]:
    data = asdict(acc)
    return {"lost": data.pop("lost"), "stuck": data.pop("stuck"),
            "duplicates": data.pop("duplicates"), **{k: v for k, v in data.items()}}


def check_accounting(acc: Accounting, what: str) -> None:
    """The correctness half of every fault test."""
    assert acc.lost == 0, f"{what}: {acc.lost} job(s) lost: {acc.lost_ids} ({acc.states})"
    assert acc.stuck == 0, f"{what}: {acc.stuck} job(s) stuck: {acc.stuck_ids} ({acc.states})"
    assert acc.phantom == 0, f"{what}: {acc.phantom} completed job(s) never ran to the end"


def wait_progress(dsn: str, ids: list[int], at_least: int, timeout: float, message: str) -> int:
    return wait_until(lambda: (n := completed_count(dsn, ids)) is not None and n >= at_least
                      and n, timeout=timeout, interval=0.05, message=message)


def first_line_of(lines: Iterable[str], needle: str) -> str | None:
    return next((line for line in lines if needle in line), None)


Predicate = Callable[[], Any]


# The private server of the connection-scarcity tests: few ordinary slots.
SCARCE_MAX_CONNECTIONS = 20
SCARCE_RESERVED = 3


def scarce_server(private_pg: Any) -> tuple[Any, str, str]:
    """A private server with SCARCE_MAX_CONNECTIONS slots (SCARCE_RESERVED
    for superusers); a database Pulse reaches as the ordinary role `pulse`
    (migrated), and a role `hog` to take the ordinary slots. Returns the
    server, Pulse's DSN and a superuser DSN (the test's own clients use the
    reserved slots)."""
    pg = private_pg({"max_connections": str(SCARCE_MAX_CONNECTIONS),
                     "superuser_reserved_connections": str(SCARCE_RESERVED)}, migrate_db=False)
    with psycopg.connect(pg.admin_dsn("postgres"), autocommit=True) as conn:
        conn.execute("CREATE ROLE pulse LOGIN")
        conn.execute("CREATE ROLE hog LOGIN")
        conn.execute("CREATE DATABASE pulse_app OWNER pulse")
    app_dsn = make_conninfo(pg.admin_dsn("pulse_app"), user="pulse")
    with psycopg.connect(app_dsn, autocommit=True) as conn:
        migrate(conn)
    return pg, app_dsn, pg.admin_dsn("pulse_app")
