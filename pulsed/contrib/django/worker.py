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

from pulsed.contrib.django import mapping  # noqa: E402
from pulsed.contrib.django.backend import import_task  # noqa: E402
from pulsed.contrib.django.compat import (  # noqa: E402
    Task,
    TaskContext,
    normalize_json,
    task_backends,
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


def _context(job: Job) -> TaskContext:
    """What a takes_context task receives: its TaskResult as stored now
    (attempts so far, who ran them), read on this thread's connection."""
    return TaskContext(task_result=task_backends[_backend_alias(job)].get_result(str(job.id)))


@pulsed.handler(mapping.SYNC_TYPE)
def run_task(job: Job) -> Any:
    """A plain `def` task (a coroutine one, should the code have changed
    since the enqueue, runs through async_to_sync: Task.call)."""
    task = _task(job)
    args, kwargs = _arguments(job)
    close_old_connections()
    try:
        if task.takes_context:
            args = [_context(job), *args]
        return normalize_json(task.call(*args, **kwargs))
    finally:
        close_old_connections()


@pulsed.handler(mapping.ASYNC_TYPE)
async def run_async_task(job: Job) -> Any:
    """An `async def` task, awaited on the worker's event loop. Django's
    connections it uses live in asgiref's thread for sync code (the async
    ORM runs there), so they are closed there."""
    task = _task(job)
    args, kwargs = _arguments(job)
    await sync_to_async(close_old_connections)()
    try:
        if task.takes_context:
            args = [await sync_to_async(_context)(job), *args]
        return normalize_json(await task.acall(*args, **kwargs))
    finally:
        await sync_to_async(close_old_connections)()
