"""Django tasks run by a real `pulsed` daemon: from the enqueue in a
view-like function, through a worker process that set Django up itself,
to get_result() in the web process."""

from __future__ import annotations

import psycopg
import pulsed
from tests.system.daemon import Daemon

WAIT_S = 30


def finished(probe: psycopg.Connection, result_id: str) -> None:
    """Block until the job ends (pulsed.wait: a NOTIFY, not polling)."""
    pulsed.wait(probe, int(result_id), timeout=WAIT_S)


def test_view_to_result(pulse_daemon: Daemon, probe: psycopg.Connection) -> None:
    from pulse_demo.views import create_note
    from pulse_demo.tasks import note_length
    note, enqueued = create_note("four")
    finished(probe, enqueued.id)
    result = note_length.get_result(enqueued.id)
    # The worker read the row the view committed with the job.
    assert result.status == "SUCCESSFUL", result.errors
    assert result.return_value == {"id": note.pk, "length": 4}
    assert result.is_finished and result.errors == [] and result.attempts == 1
    assert result.worker_ids[0].startswith("node-a")
    assert result.enqueued_at <= result.started_at <= result.finished_at
    assert result.last_attempted_at == result.started_at
    enqueued.refresh()  # TaskResult.refresh() goes through get_result() too
    assert enqueued.status == "SUCCESSFUL" and enqueued.return_value == result.return_value


def test_async_task_runs_on_the_workers_loop(pulse_daemon: Daemon,
                                             probe: psycopg.Connection) -> None:
    from pulse_demo.models import Note
    from pulse_demo.tasks import slow_double
    note = Note.objects.create(text="ab")
    enqueued = slow_double.enqueue(note.pk)
    finished(probe, enqueued.id)
    result = slow_double.get_result(enqueued.id)
    assert result.status == "SUCCESSFUL", result.errors
    assert result.return_value == "abab"


def test_context_sees_its_own_result(pulse_daemon: Daemon, probe: psycopg.Connection) -> None:
    from pulse_demo.tasks import whoami
    enqueued = whoami.enqueue("x")
    finished(probe, enqueued.id)
    result = whoami.get_result(enqueued.id)
    assert result.return_value == {"tag": "x", "id": enqueued.id, "attempt": 1}, result.errors


def test_a_failing_task_shows_its_error(pulse_daemon: Daemon, probe: psycopg.Connection) -> None:
    import pytest
    from pulse_demo.tasks import Broken, divide, explode
    broken, by_zero = explode.enqueue("it broke"), divide.enqueue(1, 0)
    finished(probe, broken.id)
    finished(probe, by_zero.id)
    result = explode.get_result(broken.id)
    assert result.status == "FAILED" and result.is_finished and result.finished_at
    [error] = result.errors
    assert error.exception_class_path == "pulse_demo.tasks.Broken"
    assert error.exception_class is Broken
    assert "it broke" in error.traceback and "raise Broken(message)" in error.traceback
    with pytest.raises(ValueError):
        result.return_value  # noqa: B018 - Django raises for a failed task
    [error] = divide.get_result(by_zero.id).errors
    assert error.exception_class is ZeroDivisionError


def test_connections_are_closed_after_each_job(pulse_daemon: Daemon,
                                               probe: psycopg.Connection) -> None:
    """CONN_MAX_AGE is 0 (Django's default): the connection a task used is
    closed when the job ends, as after a request, not left idle in the
    worker."""
    from tests.pg import wait_until
    from pulse_demo.tasks import backend_pid
    enqueued = backend_pid.enqueue()
    finished(probe, enqueued.id)
    pid = backend_pid.get_result(enqueued.id).return_value
    wait_until(lambda: probe.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                     (pid,)).fetchone()[0] == 0,
               message=f"the task's connection (backend {pid}) to be closed")


def test_a_killed_worker_shows_as_a_lost_attempt(pulse_daemon: Daemon,
                                                 probe: psycopg.Connection) -> None:
    """kill -9 under a task (its backend allows one attempt): the master
    records the dead worker, the result is FAILED with AttemptLost; the
    daemon starts a new worker, which sets Django up again and runs on."""
    from pulse_demo.tasks import add, die
    from pulsed.contrib.django.mapping import AttemptLost
    enqueued = die.enqueue()
    finished(probe, enqueued.id)
    result = die.get_result(enqueued.id)
    assert result.status == "FAILED"
    [error] = result.errors
    assert error.exception_class is AttemptLost and "worker_died" in error.traceback
    after = add.enqueue(20, 22)
    finished(probe, after.id)
    assert add.get_result(after.id).return_value == 42


def test_signals_in_the_web_and_worker_processes(pulse_daemon: Daemon,
                                                 probe: psycopg.Connection) -> None:
    """task_enqueued in the enqueuing process; task_started and
    task_finished in the worker, with the attempt's outcome."""
    from pulse_demo.models import SignalLog
    from pulse_demo.tasks import add, explode, slow_double
    from pulse_demo.models import Note
    done, broken = add.enqueue(1, 1), explode.enqueue("no")
    awaited = slow_double.enqueue(Note.objects.create(text="z").pk)
    for enqueued in (done, broken, awaited):
        finished(probe, enqueued.id)

    def log(result_id: str) -> list[tuple[str, str, list[str]]]:
        return [(row.signal, row.status, row.errors)
                for row in SignalLog.objects.filter(result_id=result_id).order_by("pk")]

    assert log(done.id) == [("enqueued", "READY", []), ("started", "RUNNING", []),
                            ("finished", "SUCCESSFUL", [])]
    assert log(awaited.id)[-1] == ("finished", "SUCCESSFUL", [])
    assert log(broken.id) == [("enqueued", "READY", []), ("started", "RUNNING", []),
                              ("finished", "FAILED", ["pulse_demo.tasks.Broken"])]


def test_the_worker_module_names_missing_settings() -> None:
    """A worker started without DJANGO_SETTINGS_MODULE cannot boot and
    says what to set (pulsed --check-config shows the same import)."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run([sys.executable, "-c", "import pulsed.contrib.django.worker"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "ImproperlyConfigured" in done.stderr and "DJANGO_SETTINGS_MODULE" in done.stderr
