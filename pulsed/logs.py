"""Logging to stderr: plain lines for people, JSON lines for log shippers.

Every line carries the process role and pid; job lines carry the job id,
type, attempt and outcome as fields (`extra=`), which the JSON formatter
emits as keys.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from pulsed.output import printable

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

# The process role, set once per process (master, or the child after fork).
_role = "master"


def set_role(role: str) -> None:
    global _role
    _role = role


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
            "role": getattr(record, "role", _role), "pid": os.getpid(),
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items()
                      if k not in _STANDARD_ATTRS and k != "role"})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


PLAIN_FORMAT = "%(asctime)s %(levelname)-7s %(role)s[%(process)d] %(name)s: %(message)s"


class PlainFormatter(logging.Formatter):
    """PLAIN_FORMAT, one record a line: a message's control characters are
    escaped (printable()). Messages carry job types and errors, which any
    application or HTTP client writes: a newline or CR in an error forged
    a line from another process ("...INFO master[1] ..."), and ESC
    sequences reached the terminal pulsed runs in. A traceback (exc_info)
    keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


# The handler setup_logging() installed, and its format: job outcome lines
# take a shortcut to it (below) while it is the only one.
_ours: logging.StreamHandler | None = None
_ours_json = False


def setup_logging(fmt: str = "plain", level: str = "info") -> None:
    global _ours, _ours_json
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RoleFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter(PLAIN_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _ours, _ours_json = handler, fmt == "json"


# -- job outcome lines ------------------------------------------------------------


def job_outcomes(logger: logging.Logger, reports: Sequence[Any]) -> None:
    """One INFO line per finished attempt (metrics.JobReport), the same
    lines logger.info() would write. A worker logs the jobs of a batch at
    once: with only setup_logging()'s handler in place they are formatted
    here and written in one write() (logging's per-record machinery cost
    a fifth of a no-op job); otherwise they go through logging as usual.
    Either way a line carries the time its job ended."""
    if not reports or not logger.isEnabledFor(logging.INFO):
        return
    handler = _ours
    if handler is None or not _only_handler(logger, handler) or handler.level > logging.INFO:
        for report in reports:
            logger.handle(_record(logger, report))
        return
    pid = os.getpid()
    if _ours_json:
        lines = [_json_line(logger.name, pid, report) for report in reports]
    else:
        lines = _plain_lines(f"INFO    {_role}[{pid}] {logger.name}: ", reports)
    handler.acquire()
    try:
        handler.stream.write("".join(lines))
        handler.flush()
    except Exception:  # noqa: BLE001 - as logging does: a log write never fails a job
        handler.handleError(logging.makeLogRecord({"msg": "job outcome lines"}))
    finally:
        handler.release()


def _record(logger: logging.Logger, report: Any) -> logging.LogRecord:
    """The record logger.info() would make, stamped when the job ended."""
    fmt, *args = _job_message(report)
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, fmt, tuple(args), None,
                               extra=_job_fields(report))
    record.created = report.ended_at
    record.msecs = int(report.ended_at % 1 * 1000)
    return record


def _only_handler(logger: logging.Logger, handler: logging.Handler) -> bool:
    """Would logging send this logger's records to `handler` alone?"""
    current: logging.Logger | None = logger
    while current is not None:
        if current.handlers:
            return current.handlers == [handler] and current is logging.getLogger()
        if not current.propagate or current.filters:
            return False
        current = current.parent  # type: ignore[assignment]
    return False


def _job_message(report: Any) -> tuple[str, ...]:
    job = report.job
    error = getattr(report, "error", None)
    if error:  # a retry's line says why, as a failure's does
        return ("job %s#%d attempt %d %s in %.3fs: %s", job.type, job.id, job.attempt,
                report.outcome, report.duration_s, error)
    return ("job %s#%d attempt %d %s in %.3fs", job.type, job.id, job.attempt,
            report.outcome, report.duration_s)


def _format_message(report: Any) -> str:
    """_job_message's text, formatted directly (JSON lines; _plain_lines
    writes the same text inline). tests/unit/test_logs.py checks both
    formats' lines against logging's."""
    job = report.job
    text = f"job {job.type}#{job.id} attempt {job.attempt} {report.outcome} in {report.duration_s:.3f}s"
    error = getattr(report, "error", None)
    return f"{text}: {error}" if error else text


def _job_fields(report: Any) -> dict[str, Any]:
    job = report.job
    fields = {"job_id": job.id, "job_type": job.type, "attempt": job.attempt,
              "outcome": report.outcome, "duration_s": round(report.duration_s, 6)}
    error = getattr(report, "error", None)
    if error:
        fields["error"] = error
    return fields


def _json_line(name: str, pid: int, report: Any) -> str:
    ended = report.ended_at
    entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ended))
                   + f".{int(ended % 1 * 1000):03d}Z",
             "level": "info", "logger": name, "role": _role, "pid": pid,
             "message": _format_message(report), **_job_fields(report)}
    return json.dumps(entry, default=str) + "\n"


_second: tuple[int, str] = (-1, "")


def _plain_lines(prefix: str, reports: Sequence[Any]) -> list[str]:
    """The plain lines of job_outcomes: logging's asctime (its seconds
    formatted once per second) and _format_message's text, written out in
    one loop (two calls a job were a fifth of a line's ~1.5 us;
    tests/unit/test_logs.py checks the lines against logging's)."""
    global _second
    second, stamp = _second
    lines = []
    for report in reports:
        ended = report.ended_at
        whole = int(ended)
        if whole != second:
            second, stamp = whole, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(whole))
        job = report.job
        error = getattr(report, "error", None)
        text = (f"{stamp},{int((ended - whole) * 1000):03d} {prefix}job "
                f"{printable(job.type)}#{job.id} "
                f"attempt {job.attempt} {report.outcome} in {report.duration_s:.3f}s")
        # escaped as PlainFormatter does: an error's newline forged log lines
        lines.append(f"{text}: {printable(error)}\n" if error else f"{text}\n")
    _second = (second, stamp)
    return lines
