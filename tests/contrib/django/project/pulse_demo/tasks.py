"""The project's tasks, as an application writes them."""

import asyncio

from pulse_demo.models import Note

try:
    from django.tasks import task
except ImportError:  # Django 5.2: the backport
    from django_tasks import task


class Broken(Exception):
    """A task's own error class (its path must reach get_result())."""


@task
def note_length(note_id):
    """Reads the row the enqueuing view wrote (it committed with the job)."""
    note = Note.objects.get(pk=note_id)
    return {"id": note.pk, "length": len(note.text)}


@task
def add(a, b):
    return a + b


@task
async def slow_double(note_id):
    await asyncio.sleep(0.01)  # a real await on the worker's loop
    note = await Note.objects.aget(pk=note_id)
    return note.text * 2


@task(backend="once")
def explode(message):
    raise Broken(message)


@task(backend="once")
def divide(a, b):
    return a / b


@task(takes_context=True)
def whoami(context, tag):
    return {"tag": tag, "id": context.task_result.id, "attempt": context.attempt}


@task
def backend_pid():
    """The PostgreSQL backend serving this task's Django connection."""
    from django.db import connection
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


@task(backend="once")
def die():
    """The worker process is killed under the task (kill -9)."""
    import os
    import signal
    os.kill(os.getpid(), signal.SIGKILL)
