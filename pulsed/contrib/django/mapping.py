"""How a Django task maps onto a Pulse job, and a Pulse job back onto a
Django TaskResult: job types, payload, priorities, states, errors.

Pure functions on values: no database, no Django settings."""

from __future__ import annotations

from collections.abc import Mapping
import builtins
import re
from datetime import datetime
from typing import Any

from pulsed.jobs import Attempt, JobRecord, JobState

# Two job types so an `async def` task runs on the worker's event loop
# (Pulse picks the mode per handler) and a plain one on a worker thread.
SYNC_TYPE = "django.task"
ASYNC_TYPE = "django.task.async"
JOB_TYPES = (SYNC_TYPE, ASYNC_TYPE)

# Django: -100..100, larger runs first, default 0. Pulse: smallint, smaller
# runs first, default 0. Negating keeps the order, the default and every
# value exactly (and inverts without loss).
def pulse_priority(django_priority: int) -> int:
    return -int(django_priority)


def django_priority(pulse_priority: int, low: int, high: int) -> int:
    """The Django priority of a job; clamped, in case an operator set a
    Pulse priority beyond Django's range on the row."""
    return max(low, min(high, -int(pulse_priority)))


def job_type(is_async: bool) -> str:
    return ASYNC_TYPE if is_async else SYNC_TYPE


def task_payload(*, module_path: str, args: list[Any], kwargs: dict[str, Any], backend: str,
                 run_after: datetime | None) -> dict[str, Any]:
    """The job's payload: what the worker needs to call the task, and what
    get_result() needs to rebuild the Task (args and kwargs already
    JSON-normalised by the caller)."""
    return {"task": module_path, "args": args, "kwargs": kwargs, "backend": backend,
            "run_after": None if run_after is None else run_after.isoformat()}


def payload_task_path(payload: Mapping[str, Any]) -> str:
    path = payload.get("task") if isinstance(payload, Mapping) else None
    if not isinstance(path, str) or not path:
        raise ValueError(f"the job's payload names no task (payload 'task' is {path!r})")
    return path


def payload_run_after(payload: Mapping[str, Any]) -> datetime | None:
    text = payload.get("run_after")
    return None if text is None else datetime.fromisoformat(text)


# Pulse state -> Django status name. A job that will run (again) is READY;
# a cancelled one never finishes its work: FAILED ("unable to start").
_STATUS_NAMES = {
    JobState.SCHEDULED: "READY",
    JobState.AVAILABLE: "READY",
    JobState.RETRYABLE: "READY",
    JobState.RUNNING: "RUNNING",
    JobState.COMPLETED: "SUCCESSFUL",
    JobState.FAILED: "FAILED",
    JobState.CANCELLED: "FAILED",
}


def status_name(state: JobState) -> str:
    return _STATUS_NAMES[state]


# Attempts that did not fail the task: it ran to the end, or was put back
# without its fault (snoozed, interrupted by an operator's stop).
_NOT_ERRORS = {"completed", "snoozed", "interrupted"}


def error_attempts(attempts: tuple[Attempt, ...] | list[Attempt]) -> list[Attempt]:
    return [a for a in attempts if a.outcome not in _NOT_ERRORS]


class AttemptLost(Exception):
    """The attempt ended without an exception of the task's own that can be
    named: its worker process died (crash, kill -9), its lease expired (the
    host vanished), or Pulse failed it for a reason of its own. Pulse
    records these with a bare name (WorkerDied, LeaseExpired, ...) that no
    module defines; Django's TaskError needs an importable class."""


# What the worker raises in a handler past its timeout (and the name the
# master records when it has to kill the process instead).
TIMEOUT_CLASS_PATH = "pulsed.worker.JobTimeout"


def exception_class_path(attempt: Attempt) -> str:
    """A dotted path of the exception class, as Django's TaskError wants.
    Pulse records the class's __qualname__ only; the traceback's own line
    for it names it with its module (traceback prints `module.Class:
    message` for anything outside builtins), so that is looked up first."""
    qualname = attempt.error_class
    if qualname and attempt.traceback:
        named = _named_in_traceback(attempt.traceback, qualname)
        if named and named != qualname:
            return named
    if qualname and isinstance(getattr(builtins, qualname, None), type) \
            and issubclass(getattr(builtins, qualname), BaseException):
        return f"builtins.{qualname}"  # traceback prints builtins bare
    if attempt.outcome == "timeout":
        return TIMEOUT_CLASS_PATH
    return f"{__name__}.AttemptLost"


def _named_in_traceback(text: str, qualname: str) -> str | None:
    """The dotted name of the exception line `[module.]qualname[: ...]`
    nearest the end of a traceback (the one raised last)."""
    line = re.compile(rf"^((?:[\w.]+\.)?{re.escape(qualname)})(?::|$)")
    for candidate in reversed(text.splitlines()):
        found = line.match(candidate)
        if found:
            return found[1]
    return None


def error_text(attempt: Attempt) -> str:
    """The TaskError's traceback: the recorded one, else what Pulse knows."""
    if attempt.traceback:
        return attempt.traceback
    message = attempt.error_message or attempt.outcome
    return f"{attempt.outcome}: {message}"


def worker_ids(record: JobRecord) -> list[str]:
    """Who ran each attempt, in order (the running one's lease owner last)."""
    ids = [a.worker or "" for a in record.attempts or () if a.outcome != "snoozed"]
    if record.state == JobState.RUNNING and record.lease_owner:
        ids.append(record.lease_owner)
    return ids


def first_started(record: JobRecord) -> datetime | None:
    starts = [a.started_at for a in record.attempts or () if isinstance(a.started_at, datetime)]
    return min(starts) if starts else (record.started_at if isinstance(record.started_at, datetime) else None)
