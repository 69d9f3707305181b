"""pulsectl's output: the SPEC §9 shapes and rich views of them.

``job_to_dict`` and ``to_json`` use no rich, so the HTTP API can share them.
Every view takes the machine-readable dicts, so what people see and what
scripts get (``--json``) come from the same data. User data (payloads,
error messages) goes into ``Text`` objects, never into markup, and through
``printable`` (_plain, _lines): a job's text never drives the terminal.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pulsed.output import printable
from pulsed.status_report import (ChildInfo, ConnectionUsage, LeaderInfo, MasterInfo, QueueDepth,
                                  StatusReport)


MASTER_STATE_STYLES = {"running": "green", "draining": "yellow", "drained": "yellow",
                       "stopping": "red"}
CHILD_STATE_STYLES = {"starting": "yellow", "idle": "green", "busy": "bold cyan",
                      "draining": "yellow", "stopping": "magenta", "backoff": "bold red"}
JOB_STATE_STYLES = {"scheduled": "blue", "available": "cyan", "running": "bold yellow",
                    "retryable": "magenta", "completed": "green", "failed": "bold red",
                    "cancelled": "dim"}
OUTCOME_STYLES = {"completed": "green", "error": "red", "timeout": "red",
                  "worker_died": "bold red", "lease_expired": "magenta", "snoozed": "blue",
                  "cancelled": "dim", "failed": "bold red"}
NONE = "-"


# -- status ---------------------------------------------------------------------


def status_view(status: StatusReport | Mapping[str, Any]) -> RenderableType:
    """`pulsectl status`: the master line, the children, the queues."""
    report = status if isinstance(status, StatusReport) else StatusReport.from_json(status)
    parts: list[RenderableType] = [_master_line(report.master), _leader_line(report.leader)]
    children = report.children
    parts.append(children_table(children) if children else Text("no children", style="dim"))
    parts += [Text.assemble((f"{_plain(c.role)} {_plain(c.index)}: ", "bold"), (_plain(c.error), "red"))
              for c in children if c.error]
    parts.append(queues_table(report.queues) if report.queues
                 else Text("no queued jobs", style="dim"))
    parts.append(oldest_line(report.oldest_available_age_s))
    if report.unhandled_types:  # they wait for a worker that may never come
        parts.append(Text.assemble(("WARNING", "bold yellow"), ": jobs wait for types no live "
                                   "worker handles: ", (", ".join(
                                       f"{_plain(u.type)} ({_plain(u.count)})"
                                       for u in report.unhandled_types), "yellow")))
    if report.paused_queues:
        parts.append(Text.assemble("paused queues: ",
                                   (", ".join(map(_plain, report.paused_queues)), "yellow")))
    if report.nodes:
        parts.append(Text.assemble("live nodes: ", ", ".join(_plain(n.node_id) for n in report.nodes)))
    if report.connections:
        parts.append(connections_line(report.connections))
    return Group(*parts)


def connections_line(usage: ConnectionUsage) -> Text:
    """"database connections: 23 of 97 in use (20 Pulse's, every node)"."""
    full = usage.available and usage.total >= 0.8 * usage.available
    return Text.assemble("database connections: ",
                         (f"{usage.total} of {usage.available}", "bold red" if full else "bold"),
                         f" in use ({usage.pulse} Pulse's, every node)")


def oldest_line(age: float | None) -> Text:
    return Text.assemble("oldest available job: ",
                         (f"{format_duration(age)} old", "bold") if age is not None
                         else ("none waiting", "dim"))


def _master_line(master: MasterInfo) -> Text:
    line = Text.assemble(
        ("pulsed ", "bold"), (str(master.version or ""), "bold"),
        "  pid ", _plain(master.pid),
        "  ", (master.state, MASTER_STATE_STYLES.get(master.state, "")),
        "  up ", format_duration(master.uptime_s),
        "  node ", (_plain(master.node_id), "bold"),
    )
    if master.autoscale:
        line.append_text(_autoscale_note(master.autoscale, master.workers_desired))
    if master.degraded:  # running, yet no job can run here
        line.append_text(Text.assemble("\n", ("DEGRADED", "bold red"), ": ",
                                       _plain(master.degraded_reason)))
    return line


def _autoscale_note(autoscale: Mapping[str, Any], desired: int | None) -> Text:
    """"  workers 4 (autoscaling 2..16; last: 2 -> 4, 30 job(s) waiting)"."""
    bounds = f"{autoscale.get('min')}..{autoscale.get('max')}"
    how = (f"pinned; autoscaling {bounds} after `scale workers=auto`"
           if autoscale.get("pinned") is not None else f"autoscaling {bounds}")
    change = autoscale.get("last_change")
    last = (f"; last: {change.get('from')} -> {change.get('to')}, {change.get('reason')}"
            if isinstance(change, Mapping) else "")
    return Text.assemble("  workers ", (_plain(desired), "bold"), f" ({how}{last})")


def _leader_line(leader: LeaderInfo) -> Text:
    if leader.node_id is None:
        return Text.assemble("leader: ", ("none", "yellow"))
    who = "this node" if leader.is_me else _plain(leader.node_id)
    return Text.assemble("leader: ", (who, "bold"), f" (term {_plain(leader.term)})")


def children_table(children: Iterable[ChildInfo]) -> Table:
    """One row a child; a child's error (why it is in backoff) goes below the table."""
    table = _table("role", "#>", "pid>", "state", "job>", "jobs done>", "restarts>", "RSS>")
    for child in children:
        table.add_row(Text(_plain(child.role)), Text(_plain(child.index)), Text(_plain(child.pid)),
                      Text(child.state, style=CHILD_STATE_STYLES.get(child.state, "")),
                      Text(_job_cell(child)), Text(_plain(child.jobs_done)),
                      Text(_plain(child.restarts)), Text(format_bytes(child.rss_bytes)))
    return table


def queues_table(queues: Iterable[QueueDepth]) -> Table:
    table = _table("type", "state", "count>")
    for queue in queues:
        table.add_row(Text(_plain(queue.type)),
                      Text(queue.state, style=JOB_STATE_STYLES.get(queue.state, "")),
                      Text(_plain(queue.count)))
    return table


# -- jobs -------------------------------------------------------------------------


def jobs_table(jobs: Iterable[Mapping[str, Any]]) -> Table:
    """`pulsectl jobs`: one line a job, newest first; the last error cut to fit."""
    table = _table("id>", "type", "state", "priority>", "attempt>", "run at", "last error~")
    for job in jobs:
        state = str(job.get("state", ""))
        table.add_row(
            Text(_plain(job.get("id"))), Text(_plain(job.get("type"))),
            Text(state, style=JOB_STATE_STYLES.get(state, "")),
            Text(_plain(job.get("priority"))),
            Text(f"{_plain(job.get('attempt'))}/{_max_attempts(job)}"),
            Text(format_time(job.get("run_at"), seconds=False)),
            _OneLine(Text(_first_line(job.get("last_error")), style="red")),
        )
    return table


def job_view(job: Mapping[str, Any]) -> RenderableType:
    """`pulsectl job ID`: its fields, its attempts, their errors and tracebacks."""
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold", no_wrap=True)
    fields.add_column(overflow="fold")
    state = str(job.get("state", ""))
    rows: list[tuple[str, Text]] = [
        ("id", Text(_plain(job.get("id")))),
        ("type", Text(_plain(job.get("type")))),
        ("queue", Text(_plain(job.get("queue")))),
        ("state", Text(state, style=JOB_STATE_STYLES.get(state, ""))),
        ("priority", Text(_plain(job.get("priority")))),
        ("attempt", Text(f"{_plain(job.get('attempt'))} of {_max_attempts(job)}")),
        ("payload", Text(printable(json.dumps(job.get("payload"), ensure_ascii=False,
                                              default=str)))),
        ("run at", Text(format_time(job.get("run_at")))),
        ("created", Text(format_time(job.get("created_at")))),
        ("started", Text(format_time(job.get("started_at")))),
        ("finished", Text(format_time(job.get("finished_at")))),
        ("idempotency key", Text(_plain(job.get("idempotency_key")) + _key_scope(job))),
        ("last error", Text(_lines(job.get("last_error")), style="red")),
    ]
    progress = job.get("progress")
    if isinstance(progress, dict):
        note = f" {_plain(progress.get('message'))}" if progress.get("message") else ""
        rows.append(("progress", Text(f"{float(progress.get('fraction') or 0):.0%}{note} "
                                      f"({format_time(progress.get('at'))})")))
    if job.get("result") is not None:
        rows.append(("result", Text(printable(json.dumps(job["result"], ensure_ascii=False,
                                                         default=str)), style="green")))
    for name, value in rows:
        fields.add_row(name, value)
    parts: list[RenderableType] = [fields]
    attempts = job.get("attempts") or []
    parts.append(attempts_table(attempts) if attempts else Text("no attempts yet", style="dim"))
    for attempt in attempts:
        parts += _attempt_error(attempt)
    return Group(*parts)


def attempts_table(attempts: Iterable[Mapping[str, Any]]) -> Table:
    """One row an attempt; errors and tracebacks follow the table (see job_view)."""
    table = _table("#>", "outcome", "started", "finished", "worker")
    for attempt in attempts:
        outcome = str(attempt.get("outcome", ""))
        table.add_row(Text(_plain(attempt.get("attempt"))),
                      Text(outcome, style=OUTCOME_STYLES.get(outcome, "")),
                      Text(format_time(attempt.get("started_at"))),
                      Text(format_time(attempt.get("finished_at"))),
                      Text(_plain(attempt.get("worker"))))
    return table


def _attempt_error(attempt: Mapping[str, Any]) -> list[RenderableType]:
    error = error_text(attempt.get("error_class"), attempt.get("error"))
    title = f"attempt {_plain(attempt.get('attempt'))}"
    parts: list[RenderableType] = []
    if error:
        parts.append(Text.assemble((f"{title}: ", "bold"), (_lines(error), "red")))
    if attempt.get("traceback"):
        parts.append(Panel(Text(_lines(str(attempt["traceback"]).rstrip())),
                           title=f"{title} traceback",
                           title_align="left", border_style="red", expand=False))
    return parts


def error_text(error_class: Any, message: Any) -> str:
    """"Class: message", once: workers store the message with its class
    already in front ("RuntimeError: boom"), older rows without it."""
    text, name = str(message or ""), str(error_class or "")
    if not name or text == name or text.startswith(f"{name}:"):
        return text or name
    return f"{name}: {text}" if text else name


def _table(*columns: str) -> Table:
    """A compact table; a name ending in ">" is right-aligned, in "~" is the one
    column narrowed when the terminal is (its cells say whether they wrap)."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, expand=False, header_style="bold")
    for column in columns:
        name = column.rstrip(">~")
        stretch = column.endswith("~")
        table.add_column(_OneLine(Text(name)) if stretch else name,
                         justify="right" if column.endswith(">") else "left",
                         no_wrap=not stretch, overflow="ellipsis")
    return table


class _OneLine:
    """Text kept to one line: cut with an ellipsis to the width the table gives it,
    and measured as able to shrink, so a narrow terminal narrows this column only."""

    MIN_WIDTH = 10

    def __init__(self, text: Text) -> None:
        self.text = text

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        width = self.text.cell_len
        return Measurement(min(width, self.MIN_WIDTH), width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        text = self.text.copy()
        text.truncate(options.max_width, overflow="ellipsis")
        yield text


# -- values -----------------------------------------------------------------------


def format_duration(seconds: Any) -> str:
    """12.3s, 5m 07s, 2h 03m, 3d 04h; "-" for nothing."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return NONE
    if seconds < 60:
        return f"{max(seconds, 0):.1f}s"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


def format_bytes(count: Any) -> str:
    """1.5 MiB and the like; "-" for nothing."""
    if not isinstance(count, (int, float)) or isinstance(count, bool):
        return NONE
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024
        if count < 1024:
            break
    return f"{count:.1f} {unit}"


def format_time(value: Any, *, seconds: bool = True) -> str:
    """An ISO 8601 timestamp in local time, to the second (or minute); "-" for nothing."""
    if not value:
        return NONE
    try:
        moment = datetime.fromisoformat(str(value))
        if moment.tzinfo is not None:
            moment = moment.astimezone()
    except (ValueError, OverflowError):  # not ISO (a stored value Python cannot read), or
        return str(value)                # past year 9999 in local time
    return moment.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def _plain(value: Any) -> str:
    """A value on one line, as people see it (control characters escaped)."""
    return NONE if value is None else printable(str(value))


def _lines(value: Any) -> str:
    """_plain, keeping newlines: error messages and tracebacks."""
    return NONE if value is None else printable(str(value), lines=True)


def _key_scope(job: Mapping[str, Any]) -> str:
    """How long the job holds its idempotency key, when it has a scope."""
    if job.get("idempotency_key") is None:
        return ""
    if job.get("key_released_at"):
        return f" (released {format_time(job['key_released_at'])})"
    if job.get("unique_while"):
        return f" (held while {job['unique_while']})"
    if job.get("unique_until"):
        return f" (held until {format_time(job['unique_until'])})"
    return ""


def _job_cell(child: ChildInfo) -> str:
    """The running job as "email#123" when the type is known, else its id;
    "+3" after it when the worker runs that many more (threads, asyncio)."""
    job, job_type = child.job, child.job_type
    cell = f"{_plain(job_type)}#{job}" if job is not None and job_type else _plain(job)
    return cell + more_jobs(child) + progress_note(child)


def progress_note(child: ChildInfo) -> str:
    """" 42% step 3" for a busy child's first job that reports progress."""
    progress = child.progress
    if not isinstance(progress, Mapping):
        return ""
    try:
        note = f" {float(progress.get('fraction') or 0):.0%}"
    except (TypeError, ValueError):
        return ""
    message = progress.get("message")
    return f"{note} {_first_line(message)[:40]}" if message else note


def more_jobs(child: ChildInfo) -> str:
    """" +N" for the jobs a child runs beside its first one, else ""."""
    extra = len(child.jobs or ()) - 1
    return f" +{extra}" if extra > 0 else ""


def _first_line(text: Any) -> str:
    lines = str(text or "").strip().splitlines()
    return printable(lines[0]) if lines else ""


def _max_attempts(job: Mapping[str, Any]) -> str:
    """None until first claimed: the type's default then applies."""
    value = job.get("max_attempts")
    return "default" if value is None else _plain(value)
