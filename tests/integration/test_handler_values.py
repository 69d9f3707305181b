"""Values a handler controls that reach the worker's own writes, in every
execution mode (sync at concurrency 1, threads and `async def` at 4): an
exception class named with a NUL, a __str__ that raises SystemExit, a
Snooze whose seconds a subclass changes, a result whose encoding raises,
a progress fraction whose float is NaN, a progress report made after its
attempt ended. Each once crashed the worker, hung its job, killed its event
loop or stored a failed job as completed; now each is the attempt's error
and the jobs beside it run once."""

from __future__ import annotations

from typing import Any, Callable

import psycopg
import pytest

import pulsed
from pulsed.db.store import Store
from pulsed.jobs import Job, JobState

MODES = ["sync-1", "threads-4", "async-4"]


def _class_named(name: str) -> type[Exception]:
    cls = type("Named", (Exception,), {})
    cls.__qualname__ = name
    return cls


class _ExitingStr(Exception):
    def __str__(self) -> str:
        raise SystemExit(3)


class _HugeFloat(float):
    def __float__(self) -> float:
        return 1e300


class _NanFloat(float):
    def __float__(self) -> float:
        return float("nan")


class _NanSnooze(pulsed.Snooze):
    def __init__(self) -> None:
        super().__init__(5)
        self.seconds = float("nan")


class _BareSnooze(pulsed.Snooze):
    def __init__(self) -> None:  # never sets seconds
        Exception.__init__(self, "bare")


class _FlakySnooze(pulsed.Snooze):
    """Its seconds read well once (its own check), then raise."""

    reads = 0

    def __init__(self) -> None:
        Exception.__init__(self, "flaky")

    @property
    def seconds(self) -> float:  # type: ignore[override]
        type(self).reads += 1
        if type(self).reads > 1:
            raise RuntimeError("seconds unreadable")
        return 5.0

    @seconds.setter
    def seconds(self, value: float) -> None:
        pass


class _ExitingName(str):
    def __str__(self) -> str:
        raise SystemExit(9)


class _RaisingList(list):
    def __init__(self, error: BaseException) -> None:
        super().__init__([1])
        self.error = error

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise self.error


def _raise_nul_class() -> None:
    raise _class_named("Qual\x00Nul")("msg")


def _raise_surrogate_class() -> None:
    raise _class_named("Qual\udc80Surr")("msg")


def _raise_exiting_str() -> None:
    raise _ExitingStr()


def _snooze_huge() -> None:
    raise pulsed.Snooze(_HugeFloat(5))


def _snooze_nan_attribute() -> None:
    raise _NanSnooze()


def _snooze_bare() -> None:
    raise _BareSnooze()


def _snooze_flaky() -> None:
    _FlakySnooze.reads = 0
    raise _FlakySnooze()


def _raise_exiting_name() -> None:
    raise _class_named(_ExitingName("Evil"))("msg")


def _return_raising_runtime() -> Any:
    return _RaisingList(RuntimeError("iter boom"))


def _return_raising_exit() -> Any:
    return _RaisingList(SystemExit(5))


def _return_nested_600() -> Any:
    value: Any = 1
    for _ in range(600):
        value = [value]
    return value


# name -> (what the handler does, the recorded error's class, words in last_error)
BAD = {
    "nul-class": (_raise_nul_class, "Qual\\x00Nul", "Qual\\x00Nul: msg"),
    "surrogate-class": (_raise_surrogate_class, "Qual\\udc80Surr", "msg"),
    "str-exits": (_raise_exiting_str, "_ExitingStr", "<unprintable exception>"),
    "snooze-huge-float": (_snooze_huge, "JobInputError", "at most 3153600000 seconds"),
    "snooze-nan-attribute": (_snooze_nan_attribute, "JobInputError", "finite number"),
    "snooze-without-seconds": (_snooze_bare, "JobInputError", "must be a float, got NoneType"),
    # a property: the check once read it outside the ledger's finish, and the job stayed held
    "snooze-seconds-property": (_snooze_flaky, "JobInputError", "must be a float"),
    "class-name-str-exits": (_raise_exiting_name, "Evil", "Evil: msg"),
    "result-iter-raises": (_return_raising_runtime, "RuntimeError", "iter boom"),
    "result-iter-exits": (_return_raising_exit, "SystemExit", "5"),
    # stored on 3.12+ (its json goes deeper), unreadable by a 3.11 reader
    "result-nested-600": (_return_nested_600, "ResultNotStorable", "more than 500"),
}


def _registry(mode: str, bad: Callable[[], Any], ran: list[str]) -> pulsed.HandlerRegistry:
    def run(job: Job) -> Any:
        ran.append(job.payload["name"])
        return bad() if job.payload["name"] == "bad" else None

    async def run_async(job: Job) -> Any:
        return run(job)

    registry = pulsed.HandlerRegistry()
    registry.register("t", run_async if mode == "async-4" else run)
    return registry


def _concurrency(mode: str) -> int:
    return int(mode.rsplit("-", 1)[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_value_from_a_handler_is_its_attempts_error(
        dsn: str, conn: psycopg.Connection, mode: str, case: str) -> None:
    bad, error_class, words = BAD[case]
    ran: list[str] = []
    ids = pulsed.enqueue_many(conn, [{"type": "t", "payload": {"name": name}, "max_attempts": 1}
                                     for name in ("before", "bad", "after", "last")])
    done = pulsed.run_worker(dsn, registry=_registry(mode, bad, ran),
                             concurrency=_concurrency(mode))
    assert done == 4
    store = Store(conn)
    record = store.get_job(ids[1])
    assert record.state is JobState.FAILED, record.state  # once completed, or running for good
    [attempt] = record.attempts
    assert (attempt.outcome, attempt.error_class) == ("error", error_class)
    assert words in record.last_error
    assert [store.get_job(i).state for i in ids[::2] + ids[3:]] == [JobState.COMPLETED] * 3
    assert sorted(ran) == ["after", "bad", "before", "last"]


def test_a_progress_fraction_whose_float_is_nan_is_refused_where_it_is_given() -> None:
    job = Job(id=1, type="t", queue="default", payload={}, priority=0, attempt=1,
              max_attempts=1, idempotency_key=None, created_at=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="from 0 to 1"):
        job.progress(_NanFloat(0.5), "x")
    with pytest.raises(ValueError, match="from 0 to 1"):
        job.progress(float("nan"))
