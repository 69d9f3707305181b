"""PulseBackend: Django's Tasks framework on Pulse.

    TASKS = {"default": {
        "BACKEND": "pulsed.contrib.django.PulseBackend",
        "QUEUES": ["default", "emails"],
        "OPTIONS": {"DATABASE": "default", "MAX_ATTEMPTS": 5, "TIMEOUT": 60},
    }}

`task.enqueue()` inserts the job with pulsed.enqueue on Django's own
connection (psycopg 3) of OPTIONS["DATABASE"], inside whatever transaction
is open there: `transaction.atomic` rolls the job back with everything
else, and no worker sees it before the commit. `get_result()` reads the job
(state, return value, attempt history) on the same connection.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import psycopg
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.utils import timezone
from django.utils.module_loading import import_string
from psycopg.types.json import JsonbLoader, JsonLoader

import pulsed
from pulsed.api import job_params
from pulsed.db.store import Store
from pulsed.errors import JobInputError
from pulsed.jobs import JobRecord
from pulsed.contrib.django import mapping
from pulsed.contrib.django.compat import (
    TASK_MAX_PRIORITY,
    TASK_MIN_PRIORITY,
    BaseTaskBackend,
    Task,
    TaskError,
    TaskResult,
    TaskResultDoesNotExist,
    TaskResultStatus,
    normalize_json,
    task_enqueued,
)

# OPTIONS keys and what they set.
DATABASE = "DATABASE"  # the Django database alias jobs are written on
MAX_ATTEMPTS = "MAX_ATTEMPTS"  # pulsed.enqueue(max_attempts=); absent: Pulse's per-type default
TIMEOUT = "TIMEOUT"  # pulsed.enqueue(timeout=) in seconds; absent: none
# The Tasks draft's setting. The insert is part of the caller's transaction,
# so a job is only ever enqueued when that transaction commits: True is
# what this backend always does; False (enqueue even if it rolls back) it
# cannot do on the caller's connection, and says so.
ENQUEUE_ON_COMMIT = "ENQUEUE_ON_COMMIT"
KNOWN_OPTIONS = (DATABASE, MAX_ATTEMPTS, TIMEOUT, ENQUEUE_ON_COMMIT)
BIGINT_MAX = 2**63 - 1  # job ids are bigint


class PulseBackend(BaseTaskBackend):
    supports_defer = True  # run_after -> the job's run_at
    supports_async_task = True  # `async def` tasks run on the worker's event loop
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self._check_options()
        self.database: str = self.options.get(DATABASE, "default")
        self.max_attempts: int | None = self.options.get(MAX_ATTEMPTS)
        self.timeout: float | None = self.options.get(TIMEOUT)

    def _check_options(self) -> None:
        where = f"TASKS[{self.alias!r}]['OPTIONS']"
        if not isinstance(self.options, dict):
            raise ImproperlyConfigured(f"{where} must be a dict, got "
                                       f"{type(self.options).__name__}")
        unknown = sorted(set(self.options) - set(KNOWN_OPTIONS))
        if unknown:
            raise ImproperlyConfigured(f"{where} has unknown keys {unknown}; known: "
                                       f"{list(KNOWN_OPTIONS)}")
        database = self.options.get(DATABASE, "default")
        if not isinstance(database, str) or not database:
            raise ImproperlyConfigured(f"{where}[{DATABASE!r}] must be a database alias, "
                                       f"got {database!r}")
        if self.options.get(ENQUEUE_ON_COMMIT, True) is not True:
            raise ImproperlyConfigured(
                f"{where}[{ENQUEUE_ON_COMMIT!r}] can only be True: Pulse inserts the job in "
                f"the caller's transaction, so it exists only once that transaction commits")
        try:  # Pulse's own checks, so a bad value fails at start-up, not at enqueue
            job_params(type=mapping.SYNC_TYPE, max_attempts=self.options.get(MAX_ATTEMPTS),
                       timeout=self.options.get(TIMEOUT))
        except JobInputError as exc:
            key = {"max_attempts": MAX_ATTEMPTS, "timeout": TIMEOUT}.get(exc.argument,
                                                                          exc.argument)
            raise ImproperlyConfigured(f"{where}[{key!r}] {exc.problem}") from None
        for queue in self.queues:
            try:
                job_params(type=mapping.SYNC_TYPE, queue=queue)
            except JobInputError as exc:
                raise ImproperlyConfigured(f"TASKS[{self.alias!r}]['QUEUES'] entry {queue!r} "
                                           f"{exc.problem}") from None

    def check(self, **kwargs: Any) -> Iterable[checks.CheckMessage]:
        """`manage.py check`: the database alias exists and is PostgreSQL
        through psycopg 3 (without connecting)."""
        yield from super().check(**kwargs)
        where = f"TASKS[{self.alias!r}]"
        if self.database not in connections.settings:
            yield checks.Error(f"{where} writes jobs on database {self.database!r}, which is not "
                               f"in DATABASES", hint="set OPTIONS['DATABASE'] to an alias of "
                               "DATABASES", obj=where, id="pulsed.E001")
            return
        vendor = connections[self.database].vendor
        if vendor != "postgresql" or not _django_uses_psycopg3():
            yield checks.Error(f"{where} needs DATABASES[{self.database!r}] on PostgreSQL "
                               f"through psycopg 3 (it is {vendor}"
                               f"{'' if vendor != 'postgresql' else ' through psycopg2'})",
                               obj=where, id="pulsed.E002")

    # -- enqueue ------------------------------------------------------------

    def enqueue(self, task: Task, args: Any, kwargs: Any) -> TaskResult:
        self.validate_task(task)
        # Normalised as TaskResult will hold them; a value JSON cannot carry
        # fails here (TypeError), before anything is written.
        args, kwargs = normalize_json(list(args)), normalize_json(dict(kwargs))
        run_after = self._aware(task.run_after)
        job_id = pulsed.enqueue(
            self.raw_connection(),
            mapping.job_type(inspect.iscoroutinefunction(task.func)),
            mapping.task_payload(module_path=task.module_path, args=args, kwargs=kwargs,
                                 backend=self.alias, run_after=run_after),
            priority=mapping.pulse_priority(task.priority), run_at=run_after,
            queue=task.queue_name, max_attempts=self.max_attempts, timeout=self.timeout)
        result = TaskResult(
            task=task, id=str(job_id), status=TaskResultStatus.READY,
            enqueued_at=timezone.now(), started_at=None, last_attempted_at=None,
            finished_at=None, args=args, kwargs=kwargs, backend=self.alias, errors=[],
            worker_ids=[])
        task_enqueued.send(type(self), task_result=result)
        return result

    @staticmethod
    def _aware(moment: Any) -> Any:
        """run_after as Pulse wants it: timezone-aware. Naive values exist
        only with USE_TZ = False (validate_task refuses them otherwise) and
        mean the project's TIME_ZONE there."""
        if moment is not None and timezone.is_naive(moment):
            return timezone.make_aware(moment)
        return moment

    def raw_connection(self) -> psycopg.Connection[Any]:
        """The psycopg 3 connection under Django's wrapper for DATABASE, in
        whatever transaction state Django has it (atomic or autocommit)."""
        wrapper = connections[self.database]
        # What Django checks before its own queries: a transaction marked
        # for rollback gets Django's error naming it, not PostgreSQL's
        # "current transaction is aborted" (or a job that would vanish).
        wrapper.validate_no_broken_transaction()
        wrapper.ensure_connection()
        raw = wrapper.connection
        if not isinstance(raw, psycopg.Connection):
            raise ImproperlyConfigured(
                f"PulseBackend needs DATABASES[{self.database!r}] on PostgreSQL through "
                f"psycopg 3 (django.db.backends.postgresql with psycopg installed); its "
                f"connection is {type(raw).__module__}.{type(raw).__name__}")
        return raw

    # -- results ------------------------------------------------------------

    def get_result(self, result_id: str) -> TaskResult:
        job_id = _job_id(result_id)
        record = Store(_StandardJson(self.raw_connection())).get_job(job_id)
        if record is None or record.type not in mapping.JOB_TYPES:
            raise TaskResultDoesNotExist(result_id)
        return self.task_result(record)

    def task_result(self, record: JobRecord) -> TaskResult:
        """A stored job as Django's TaskResult."""
        payload = record.payload
        task = import_task(mapping.payload_task_path(payload)).using(
            priority=mapping.django_priority(record.priority, TASK_MIN_PRIORITY,
                                             TASK_MAX_PRIORITY),
            queue_name=record.queue, run_after=mapping.payload_run_after(payload),
            backend=self.alias)
        status = TaskResultStatus[mapping.status_name(record.state)]
        attempts = record.attempts or ()
        result = TaskResult(
            task=task, id=str(record.id), status=status, enqueued_at=record.created_at,
            started_at=mapping.first_started(record),
            last_attempted_at=record.started_at,
            finished_at=record.finished_at if record.state.is_finished else None,
            args=payload.get("args", []), kwargs=payload.get("kwargs", {}),
            backend=self.alias,
            errors=[TaskError(exception_class_path=mapping.exception_class_path(a),
                              traceback=mapping.error_text(a))
                    for a in mapping.error_attempts(attempts)],
            worker_ids=mapping.worker_ids(record))
        if status == TaskResultStatus.SUCCESSFUL:
            object.__setattr__(result, "_return_value", record.result)
        return result


def import_task(path: str) -> Task:
    """The Task a job names (its module path, e.g. "myapp.tasks.send")."""
    try:
        found = import_string(path)
    except ImportError as exc:
        raise ImportError(f"the job's task {path!r} cannot be imported: {exc}") from exc
    if not isinstance(found, Task):
        raise TypeError(f"the job's task {path!r} is a {type(found).__name__}, not a "
                        f"Task (decorate it with @task)")
    return found


def _django_uses_psycopg3() -> bool:
    from django.db.backends.postgresql.psycopg_any import is_psycopg3
    return bool(is_psycopg3)


def _job_id(result_id: Any) -> int:
    """A result id is the job's id as text; anything else names no result."""
    text = str(result_id)
    if not text.isascii() or not text.isdigit() or int(text) > BIGINT_MAX:
        raise TaskResultDoesNotExist(result_id)
    return int(text)


class _StandardJson:
    """Django's psycopg connection, with json and jsonb decoded the way
    Pulse's reads expect: Django registers a text loader for jsonb on its
    connections (it decodes JSONField itself), under which a job's payload
    and result would come back as JSON text. Only the cursors Pulse opens
    here change; Django's own are untouched."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def cursor(self, *args: Any, **kwargs: Any) -> psycopg.Cursor[Any]:
        cur = self._conn.cursor(*args, **kwargs)
        cur.adapters.register_loader("jsonb", JsonbLoader)
        cur.adapters.register_loader("json", JsonLoader)
        return cur

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)
