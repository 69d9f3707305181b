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
