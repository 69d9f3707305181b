"""PulseBackend's enqueue side on a real Django project and PostgreSQL:
the job joins Django's transaction, and Django's task options become the
job's columns. No daemon: nothing here runs."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest


def job_row(conn: psycopg.Connection, job_id: int) -> dict[str, Any] | None:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("SELECT type, queue, priority, state, run_at, payload, max_attempts, "
                    "timeout_s FROM pulse_jobs WHERE id = %s", (job_id,))
        return cur.fetchone()


def test_the_job_is_written_in_the_views_transaction(django_dsn: str,
                                                     probe: psycopg.Connection) -> None:
    from django.db import transaction
    from pulse_demo.models import Note
    from pulse_demo.tasks import note_length
    with transaction.atomic():
        note = Note.objects.create(text="hello")
        result = note_length.enqueue(note.pk)
        # Another session (a worker) sees neither the row nor the job yet.
        assert job_row(probe, int(result.id)) is None
    row = job_row(probe, int(result.id))
    assert row is not None and row["type"] == "django.task" and row["state"] == "available"
    assert row["payload"] == {"task": "pulse_demo.tasks.note_length", "args": [note.pk],
                              "kwargs": {}, "backend": "default", "run_after": None}
    assert result.status == "READY" and result.backend == "default"


def test_a_rollback_drops_the_job_with_the_row(django_dsn: str,
                                                probe: psycopg.Connection) -> None:
    from pulse_demo.models import Note
    from pulse_demo.views import create_note_then_fail
    from pulsed.contrib.django.compat import TaskResultDoesNotExist
    from pulse_demo.tasks import note_length
    seen: list[Any] = []
    create_note_then_fail("gone", seen)
    [(note_id, result)] = seen
    assert not Note.objects.filter(pk=note_id).exists()
    assert job_row(probe, int(result.id)) is None
    with pytest.raises(TaskResultDoesNotExist):
        note_length.get_result(result.id)


def test_on_commit_enqueue_runs_only_after_a_commit(django_dsn: str,
                                                     probe: psycopg.Connection) -> None:
    from pulse_demo.views import add_on_commit
    results: list[Any] = []
    add_on_commit(1, 2, results, fail=True)
    assert results == []  # rolled back: on_commit never fired
    add_on_commit(1, 2, results)
    [result] = results
    assert job_row(probe, int(result.id))["payload"]["args"] == [1, 2]


def test_priority_queue_and_run_after_become_the_jobs(django_dsn: str,
                                                      probe: psycopg.Connection) -> None:
    from pulse_demo.tasks import add
    later = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(hours=1)
    urgent = add.using(priority=100, queue_name="reports", run_after=later).enqueue(2, 3)
    lazy = add.using(priority=-100).enqueue(2, 3)
    plain = add.enqueue(2, 3)
    urgent_row, lazy_row = job_row(probe, int(urgent.id)), job_row(probe, int(lazy.id))
    # Django: larger runs first; Pulse: smaller runs first.
    assert (urgent_row["priority"], lazy_row["priority"]) == (-100, 100)
    assert job_row(probe, int(plain.id))["priority"] == 0
    assert urgent_row["queue"] == "reports" and urgent_row["state"] == "scheduled"
    assert urgent_row["run_at"] == later
    # ...and back, through get_result().
    read = add.get_result(urgent.id)
    assert (read.task.priority, read.task.queue_name, read.task.run_after) == (100, "reports",
                                                                              later)
    assert read.status == "READY" and read.args == [2, 3] and read.errors == []
    assert add.get_result(lazy.id).task.priority == -100


def test_backend_options_reach_the_job(django_dsn: str, probe: psycopg.Connection) -> None:
    from pulse_demo.tasks import divide
    row = job_row(probe, int(divide.enqueue(1, 2).id))  # backend "once"
    assert (row["max_attempts"], row["timeout_s"]) == (1, 30)


def test_async_tasks_get_their_own_job_type(django_dsn: str, probe: psycopg.Connection) -> None:
    from pulse_demo.tasks import slow_double
    assert job_row(probe, int(slow_double.enqueue(1).id))["type"] == "django.task.async"


def test_bad_input_is_refused_before_anything_is_written(django_dsn: str,
                                                         probe: psycopg.Connection) -> None:
    from pulsed.contrib.django.compat import InvalidTask
    from pulse_demo.tasks import add
    with pytest.raises(InvalidTask, match="priority"):
        add.using(priority=101)
    with pytest.raises(InvalidTask, match="Queue 'nowhere'"):
        add.using(queue_name="nowhere")
    before = probe.execute("SELECT count(*) FROM pulse_jobs").fetchone()[0]
    with pytest.raises(TypeError):
        add.enqueue(object(), 1)  # not JSON: refused before the insert
    assert probe.execute("SELECT count(*) FROM pulse_jobs").fetchone()[0] == before


def test_unknown_result_ids_do_not_exist(django_dsn: str) -> None:
    from pulsed.contrib.django.compat import TaskResultDoesNotExist
    from pulse_demo.tasks import add
    for bad in ("nope", "-1", "99999999999999999999", "0", "１２"):
        with pytest.raises(TaskResultDoesNotExist):
            add.get_result(bad)


@pytest.mark.parametrize("options, problem", [
    ({"ENQUEUE_ON_COMMIT": False}, "ENQUEUE_ON_COMMIT'] can only be True"),
    ({"RETRIES": 3}, "unknown keys \\['RETRIES'\\]"),
    ({"MAX_ATTEMPTS": 0}, "MAX_ATTEMPTS'] must be between 1"),
    ({"TIMEOUT": -1}, "TIMEOUT'] must be a finite number"),
    ({"DATABASE": ""}, "DATABASE'] must be a database alias"),
])
def test_bad_options_are_named_at_start_up(django_dsn: str, options: dict[str, Any],
                                           problem: str) -> None:
    from django.core.exceptions import ImproperlyConfigured
    from pulsed.contrib.django import PulseBackend
    with pytest.raises(ImproperlyConfigured, match=problem):
        PulseBackend("broken", {"OPTIONS": options})


def test_a_database_without_psycopg3_is_named(django_dsn: str) -> None:
    from django.core.exceptions import ImproperlyConfigured
    from pulsed.contrib.django import PulseBackend
    backend = PulseBackend("sqlite", {"OPTIONS": {"DATABASE": "sqlite"}})
    with pytest.raises(ImproperlyConfigured, match="psycopg 3.*sqlite3"):
        backend.raw_connection()


def test_async_enqueue_and_result(django_dsn: str, probe: psycopg.Connection) -> None:
    """aenqueue/aget_result (an async view's calls) go through Django's
    thread for sync database code, on its own connection."""
    import asyncio
    from pulse_demo.tasks import add

    async def view() -> tuple[Any, Any]:
        enqueued = await add.aenqueue(4, 5)
        return enqueued, await add.aget_result(enqueued.id)

    enqueued, read = asyncio.run(view())
    assert job_row(probe, int(enqueued.id))["payload"]["args"] == [4, 5]
    assert read.id == enqueued.id and read.status == "READY"


def test_system_checks_name_a_database_pulse_cannot_use(django_dsn: str) -> None:
    from django.core.management import call_command
    from pulsed.contrib.django import PulseBackend

    def ids(database: str) -> list[str]:
        return [m.id for m in PulseBackend("x", {"OPTIONS": {"DATABASE": database}}).check()]

    assert ids("default") == []
    assert ids("sqlite") == ["pulsed.E002"]
    assert ids("missing") == ["pulsed.E001"]
    call_command("check")  # the project's own backends pass Django's checks


def test_a_transaction_marked_for_rollback_refuses_the_enqueue(
        django_dsn: str, probe: psycopg.Connection) -> None:
    from django.db import transaction
    from django.db.transaction import TransactionManagementError
    from pulse_demo.tasks import add
    before = probe.execute("SELECT count(*) FROM pulse_jobs").fetchone()[0]
    with transaction.atomic():
        transaction.set_rollback(True)
        with pytest.raises(TransactionManagementError):
            add.enqueue(1, 1)
    assert probe.execute("SELECT count(*) FROM pulse_jobs").fetchone()[0] == before


def test_server_side_binding_connections_work_too(django_dsn: str,
                                                  probe: psycopg.Connection) -> None:
    from django.db import connections, transaction
    from pulse_demo.tasks import add
    bound = add.using(backend="bound", run_after=datetime.now(timezone.utc) + timedelta(hours=1))
    with transaction.atomic(using="bound"):
        enqueued = bound.enqueue(3, 4)
    assert type(connections["bound"].connection.cursor()).__name__ == "ServerBindingCursor"
    assert job_row(probe, int(enqueued.id))["state"] == "scheduled"
    read = bound.get_result(enqueued.id)
    assert read.args == [3, 4] and read.backend == "bound" and read.status == "READY"


def test_a_nested_atomic_rolled_back_drops_only_its_job(django_dsn: str,
                                                        probe: psycopg.Connection) -> None:
    from django.db import transaction
    from pulse_demo.tasks import add
    with transaction.atomic():
        kept = add.enqueue(1, 2)
        with pytest.raises(ZeroDivisionError):
            with transaction.atomic():
                inner = add.enqueue(3, 4)
                with transaction.atomic():
                    innermost = add.using(backend="bound").enqueue(5, 6)
                1 / 0
        after = add.enqueue(7, 8)
        assert job_row(probe, int(kept.id)) is None
    assert job_row(probe, int(kept.id)) is not None and job_row(probe, int(after.id))
    assert job_row(probe, int(inner.id)) is None
    # "bound" is another alias, another connection: its autocommit enqueue
    # is not part of the default database's savepoint
    assert job_row(probe, int(innermost.id)) is not None
