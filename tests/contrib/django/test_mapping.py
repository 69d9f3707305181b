"""Pulse job <-> Django task mapping, value by value (no database)."""

from __future__ import annotations

import traceback

import pytest

from pulsed.contrib.django import mapping
from pulsed.jobs import Attempt, JobState


def attempt(exc: BaseException | None, outcome: str = "error") -> Attempt:
    text = "".join(traceback.format_exception(exc)) if exc is not None else None
    return Attempt(attempt=1, worker="w", started_at=None, finished_at=None, outcome=outcome,
                   error_class=type(exc).__qualname__ if exc is not None else None,
                   error_message=str(exc) if exc is not None else "worker died",
                   traceback=text)


class Custom(Exception):
    pass


def raised(exc: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        try:
            raise cause or KeyError("inner")
        except BaseException:
            raise exc
    except BaseException as caught:
        return caught


@pytest.mark.parametrize("exc, path", [
    (raised(ValueError("bad\nValueError: multi-line message")), "builtins.ValueError"),
    (raised(Custom("x: y")), f"{__name__}.Custom"),
    # Chained: the last exception raised is the one named, not its cause.
    (raised(ValueError("outer"), cause=Custom("inner")), "builtins.ValueError"),
    (raised(Custom("outer"), cause=ValueError("inner")), f"{__name__}.Custom"),
])
def test_exception_class_path(exc: BaseException, path: str) -> None:
    assert mapping.exception_class_path(attempt(exc)) == path


@pytest.mark.parametrize("outcome, recorded, path", [
    # What the master, the reaper and the store record (bare names).
    ("timeout", "JobTimeout", "pulsed.worker.JobTimeout"),
    ("worker_died", "WorkerDied", "pulsed.contrib.django.mapping.AttemptLost"),
    ("lease_expired", "LeaseExpired", "pulsed.contrib.django.mapping.AttemptLost"),
    ("error", "UnreadableValue", "pulsed.contrib.django.mapping.AttemptLost"),
    ("worker_died", None, "pulsed.contrib.django.mapping.AttemptLost"),
])
def test_attempts_pulse_ended_name_an_importable_class(outcome: str, recorded: str | None,
                                                        path: str) -> None:
    from django.utils.module_loading import import_string
    lost = Attempt(attempt=1, worker="w", started_at=None, finished_at=None, outcome=outcome,
                   error_class=recorded, error_message="worker died")
    assert mapping.exception_class_path(lost) == path
    assert issubclass(import_string(path), BaseException)
    assert mapping.error_text(lost) == f"{outcome}: worker died"


def test_only_failed_attempts_are_errors() -> None:
    kept = [attempt(ValueError("x")), attempt(None, "timeout"), attempt(None, "worker_died")]
    passed = [attempt(None, outcome) for outcome in ("completed", "snoozed", "interrupted")]
    assert mapping.error_attempts(kept + passed) == kept


def test_every_state_has_a_django_status() -> None:
    names = {state: mapping.status_name(state) for state in JobState}
    assert names[JobState.COMPLETED] == "SUCCESSFUL" and names[JobState.RUNNING] == "RUNNING"
    assert {names[JobState.FAILED], names[JobState.CANCELLED]} == {"FAILED"}
    assert {names[s] for s in (JobState.SCHEDULED, JobState.AVAILABLE,
                               JobState.RETRYABLE)} == {"READY"}


@pytest.mark.parametrize("priority", [-100, -1, 0, 1, 100])
def test_priority_round_trip_keeps_the_order(priority: int) -> None:
    pulse = mapping.pulse_priority(priority)
    assert mapping.django_priority(pulse, -100, 100) == priority
    assert mapping.pulse_priority(priority + 1) < pulse  # larger Django: sooner in Pulse


def test_out_of_range_pulse_priorities_are_clamped() -> None:
    assert mapping.django_priority(-5000, -100, 100) == 100
    assert mapping.django_priority(5000, -100, 100) == -100
