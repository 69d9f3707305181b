"""`pulsectl top`: a live view of one node, refreshed every second.

It polls the control socket's `status` (the same data as `pulsectl status`)
and shows each child with its current job, the jobs finished over the last
minute (from the workers' `jobs_done` counters: each poll adds what every
worker finished since the previous one), the jobs that failed for good over
the last minute (from the database, when it can be reached), and the queue
depths. Ctrl-C quits and leaves the terminal as it was.

    pulsectl top
    pulsectl --socket /run/pulsed/pulsed.sock top --interval 2
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pulsectl import render
from pulsed.config import Config, load_config
from pulsed.control.client import ControlClient
from pulsed.dsn import find_database
from pulsed.db.connect import connect
from pulsed.db.store import Store
from pulsed.errors import EXIT_OK, ConfigError, NoDatabase, PulseError
from pulsed.output import printable
from pulsed.status_report import ChildInfo, LeaderInfo, MasterInfo, StatusReport

REFRESH_S = 1.0
WINDOW_S = 60.0
FAILURES_SCANNED = 1000  # newest failed jobs looked at for "failed in the last minute"
DB_TIMEOUT_S = 3


class Throughput:
    """Jobs workers finished over a sliding window, from deltas of their
    `jobs_done` counters. The first poll only sets the baseline; a worker
    first seen later (a respawn) counts from zero."""

    def __init__(self, window: float = WINDOW_S) -> None:
        self.window = window
        self.total = 0
        self._seen: dict[int, int] | None = None  # worker pid -> jobs_done
        self._samples: deque[tuple[float, int]] = deque()

    def update(self, children: Iterable[ChildInfo], now: float) -> None:
        done = {int(c.pid): int(c.jobs_done or 0) for c in children
                if c.role == "worker" and c.pid}
        if self._seen is not None:
            self.total += sum(max(0, n - self._seen.get(pid, 0)) for pid, n in done.items())
        self._seen = done
        self._samples.append((now, self.total))
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def in_window(self) -> int:
        return self.total - self._samples[0][1] if self._samples else 0

    def rate(self) -> float | None:
        """Jobs per second over the samples held; None before two polls."""
        if len(self._samples) < 2:
            return None
        span = self._samples[-1][0] - self._samples[0][0]
        return self.in_window() / span if span > 0 else None


def failed_recently(dsn: str, window: float = WINDOW_S) -> int:
    """Jobs that failed for good within the last `window` seconds."""
    since = datetime.now(timezone.utc) - timedelta(seconds=window)
    with connect(dsn, "top") as conn:
        records = Store(conn).list_jobs(state="failed", limit=FAILURES_SCANNED)
    # isinstance: a finished_at Python cannot read is shown as text (Unreadable)
    return sum(1 for r in records if isinstance(r.finished_at, datetime) and r.finished_at >= since)


class TopView:
    """What one refresh shows."""

    def __init__(self) -> None:
        self.throughput = Throughput()
        self.status: Mapping[str, Any] = {}
        self.failed: int | None = None
        self.error: str | None = None
        self.db_error: str | None = None

    def render(self, interval: float) -> RenderableType:
        report = StatusReport.from_json(self.status)
        parts: list[RenderableType] = [self._header(report.master, report.leader)]
        if self.error:
            parts.append(Text(f"pulsed unreachable: {self.error}", style="bold red"))
        parts.append(workers_table(report.children))
        parts.append(self._activity())
        parts.append(render.queues_table(report.queues) if report.queues
                     else Text("no queued jobs", style="dim"))
        parts.append(render.oldest_line(report.oldest_available_age_s))
        parts.append(Text(f"refreshing every {interval:g}s · Ctrl-C quits", style="dim"))
        return Group(*parts)

    def _header(self, master: MasterInfo, leader: LeaderInfo) -> Text:
        who = ("this node" if leader.is_me else printable(str(leader.node_id))) if leader.node_id \
            else "none"
        return Text.assemble(
            ("pulsed top ", "bold"), "node ", (printable(str(master.node_id or "-")), "bold"),
            "  pid ", str(master.pid or "-"),
            "  ", (master.state, render.MASTER_STATE_STYLES.get(master.state, "")),
            (" DEGRADED", "bold red") if master.degraded else "",
            "  up ", render.format_duration(master.uptime_s),
            "  leader ", (who, "bold"),
            f" (term {leader.term})" if leader.node_id else "")

    def _activity(self) -> Text:
        rate = self.throughput.rate()
        failed: tuple[str, str] = (
            (f"{self.failed}", "bold red" if self.failed else "green")
            if self.failed is not None else (f"- ({self.db_error})" if self.db_error
                                             else "-", "dim"))
        return Text.assemble(
            "last minute: ", (f"{self.throughput.in_window()}", "bold"), " jobs finished  ",
            (f"{rate:.1f}/s" if rate is not None else "-/s", "bold cyan"),
            "  failed for good: ", failed)


def workers_table(children: Iterable[ChildInfo]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, header_style="bold")
    for name, justify in (("role", "left"), ("#", "right"), ("pid", "right"),
                          ("state", "left"), ("current job", "left"),
                          ("jobs done", "right"), ("restarts", "right"), ("RSS", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for child in children:
        current = "" if child.job is None else (f"{printable(child.job_type or '')}#{child.job}"
                                                 + render.more_jobs(child)
                                                 + render.progress_note(child))
        table.add_row(Text(child.role), Text(str(child.index)), Text(str(child.pid or "-")),
                      Text(child.state, style=render.CHILD_STATE_STYLES.get(child.state, "")),
                      Text(current, style="cyan"), Text(str(child.jobs_done)),
                      Text(str(child.restarts)), Text(render.format_bytes(child.rss_bytes)))
    return table


def run_top(socket: Path | str, dsn: str | None = None, *, interval: float = REFRESH_S,
            console: Console | None = None, iterations: int | None = None,
            clock: Callable[[], float] = time.monotonic) -> int:
    """Show the live view until Ctrl-C (or `iterations` refreshes); 0.
    The first status request's failure (daemon unreachable) is raised."""
    client = ControlClient(socket, timeout=max(interval * 2, 2.0))
    view = TopView()
    view.status = client.request("status")
    view.throughput.update(StatusReport.from_json(view.status).children, clock())
    _poll_failures(view, dsn)
    count = 1
    try:
        with Live(view.render(interval), console=console, auto_refresh=False,
                  transient=False) as live:
            while iterations is None or count < iterations:
                time.sleep(interval)
                _poll(view, client, dsn, clock())
                live.update(view.render(interval), refresh=True)
                count += 1
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _poll(view: TopView, client: ControlClient, dsn: str | None, now: float) -> None:
    try:
        view.status = client.request("status")
        view.error = None
        view.throughput.update(StatusReport.from_json(view.status).children, now)
    except PulseError as exc:
        view.error = str(exc)
    _poll_failures(view, dsn)


def _poll_failures(view: TopView, dsn: str | None) -> None:
    if dsn is None:
        return
    try:
        view.failed, view.db_error = failed_recently(dsn), None
    except psycopg.Error:
        view.failed, view.db_error = None, "database unreachable"


def main(args: argparse.Namespace) -> int:
    """`pulsectl top` (args: socket, config, interval)."""
    config: Config | None = None
    try:
        config = load_config(args.config)
    except ConfigError:
        if args.socket is None:
            raise  # no socket without a config
    socket = args.socket if args.socket is not None else config.daemon.socket_path  # type: ignore[union-attr]
    dsn = _dsn(config) if config is not None else None
    return run_top(socket, dsn, interval=getattr(args, "interval", REFRESH_S))


def _dsn(config: Config) -> str | None:
    """The configured database, or the embedded one if it runs (never started here)."""
    try:
        return find_database(config).dsn
    except NoDatabase:
        return None
