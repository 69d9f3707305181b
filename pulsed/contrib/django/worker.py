"""The worker side: put this module in pulse.toml and Pulse's workers run
Django tasks.

    [worker]
    handlers = ["pulsed.contrib.django.worker"]
    pythonpath = ["/srv/mysite"]      # where the Django project imports from

The daemon's environment names the settings (DJANGO_SETTINGS_MODULE), as
for manage.py. Each worker process imports this module once after it
starts, so django.setup() runs once per worker process; then one handler
per job type calls the task named in the payload. Database connections
are closed around each job the way Django closes them around a request
(close_old_connections: broken ones, and ones past CONN_MAX_AGE).
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import django
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured

import pulsed
from pulsed.jobs import Job

SETTINGS_VARIABLE = "DJANGO_SETTINGS_MODULE"


def setup_django() -> None:
    """django.setup(), once: a process that already did it (a test, a
    manage.py command running a worker) is left as it is."""
    if apps.ready:
        return
    if not os.environ.get(SETTINGS_VARIABLE):
        from django.conf import settings
        if not settings.configured:
            raise ImproperlyConfigured(
                f"pulsed.contrib.django.worker needs the Django settings: set "
                f"{SETTINGS_VARIABLE} in the daemon's environment (e.g. "
                f"Environment={SETTINGS_VARIABLE}=mysite.settings in its systemd unit), and "
                f"worker.pythonpath to where that module imports from")
    django.setup()


setup_django()

# Imported after setup: the Tasks framework reads settings at import.
from asgiref.sync import sync_to_async  # noqa: E402
from django.db import close_old_connections  # noqa: E402
from django.utils import timezone  # noqa: E402

from pulsed.contrib.django import mapping  # noqa: E402
from pulsed.contrib.django.backend import PulseBackend, import_task  # noqa: E402
from pulsed.contrib.django.compat import (  # noqa: E402
    Task,
    TaskContext,
    TaskError,
    TaskResult,
    TaskResultStatus,
    normalize_json,
    task_backends,
    task_finished,
    task_started,
)


def _task(job: Job) -> Task:
    return import_task(mapping.payload_task_path(job.payload))


def _backend_alias(job: Job) -> str:
    alias = job.payload.get("backend", "default")
    return alias if isinstance(alias, str) else "default"


def _arguments(job: Job) -> tuple[list[Any], dict[str, Any]]:
    args, kwargs = job.payload.get("args", []), job.payload.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise pulsed.Fail(f"job {job.id}: payload 'args' must be a list and 'kwargs' an "
                          f"object, got {type(args).__name__} and {type(kwargs).__name__}")
    return args, kwargs


def _backend(job: Job) -> PulseBackend:
    backend = task_backends[_backend_alias(job)]
    if not isinstance(backend, PulseBackend):
        raise pulsed.Fail(f"job {job.id}: TASKS[{_backend_alias(job)!r}] is "
                          f"{type(backend).__name__} here, not PulseBackend")
    return backend


def _started(job: Job, task: Task) -> TaskResult | None:
    """The job's TaskResult as stored now (RUNNING: attempts so far, who
    ran them), sent with task_started. Read only when someone needs it: a
    takes_context task, or receivers of task_started or task_finished."""
    if not (task.takes_context or task_started.has_listeners()
            or task_finished.has_listeners()):
        return None
    backend = _backend(job)
    result = backend.get_result(str(job.id))
    task_started.send(type(backend), task_result=result)
    return result


def _finished(job: Job, result: TaskResult | None, *, value: Any = None,
              error: BaseException | None = None) -> None:
    """task_finished with this attempt's outcome. What Pulse does next is
    known here: a failure with attempts left is retried (READY), one
    without, or a pulsed.Fail, is final (FAILED)."""
    if result is None or not task_finished.has_listeners():
        return
    if error is None:
        status = TaskResultStatus.SUCCESSFUL
        object.__setattr__(result, "_return_value", value)
    elif isinstance(error, pulsed.Snooze):
        status = TaskResultStatus.READY
    else:
        final = isinstance(error, pulsed.Fail) or job.attempt >= job.max_attempts
        status = TaskResultStatus.FAILED if final else TaskResultStatus.READY
        result.errors.append(TaskError(
            exception_class_path=f"{type(error).__module__}.{type(error).__qualname__}",
            traceback="".join(traceback.format_exception(error))))
    object.__setattr__(result, "status", status)
    object.__setattr__(result, "finished_at", timezone.now())
    task_finished.send(type(_backend(job)), task_result=result)


def _with_context(task: Task, result: TaskResult | None, args: list[Any]) -> list[Any]:
    return [TaskContext(task_result=result), *args] if task.takes_context else args


@pulsed.handler(mapping.SYNC_TYPE)
def run_task(job: Job) -> Any:
    """A plain `def` task (a coroutine one, should the code have changed
    since the enqueue, runs through async_to_sync: Task.call)."""
    task = _task(job)
    args, kwargs = _arguments(job)
    close_old_connections()
    try:
        result = _started(job, task)
        try:
            value = normalize_json(task.call(*_with_context(task, result, args), **kwargs))
        except BaseException as exc:
            _finished(job, result, error=exc)
            raise
        _finished(job, result, value=value)
        return value
    finally:
        close_old_connections()


@pulsed.handler(mapping.ASYNC_TYPE)
async def run_async_task(job: Job) -> Any:
    """An `async def` task, awaited on the worker's event loop. Django's
    database code runs in asgiref's thread for sync code (the async ORM
    too), so its connections are read and closed there."""
    task = _task(job)
    args, kwargs = _arguments(job)
    await sync_to_async(close_old_connections)()
    try:
        result = await sync_to_async(_started)(job, task)
        try:
            value = normalize_json(await task.acall(*_with_context(task, result, args),
                                                    **kwargs))
        except BaseException as exc:
            await sync_to_async(_finished)(job, result, error=exc)
            raise
        await sync_to_async(_finished)(job, result, value=value)
        return value
    finally:
        await sync_to_async(close_old_connections)()
