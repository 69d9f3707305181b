"""Pulse: a durable worker queue and task scheduler on PostgreSQL."""

from __future__ import annotations

from pulsed.api import (
    Fail,
    HandlerRegistry,
    Snooze,
    cancel,
    enqueue,
    enqueue_async,
    enqueue_many,
    enqueue_many_async,
    handler,
    handlers,
)
from pulsed.dsn import connect
from pulsed.errors import JobInputError, NoDatabase, PulseError
from pulsed.jobs import Job, JobState
from pulsed.waiting import wait
from pulsed.worker import Worker, WorkerOptions, run_worker

__version__ = "0.1.0"

__all__ = [
    "Fail", "HandlerRegistry", "Job", "JobInputError", "JobState", "NoDatabase", "PulseError",
    "Snooze", "Worker", "WorkerOptions", "cancel", "connect", "enqueue", "enqueue_async",
    "enqueue_many", "enqueue_many_async", "handler", "handlers", "run_worker", "wait",
    "__version__",
]
