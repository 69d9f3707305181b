"""An `async def` handler's failure is recorded from a thread of the event
loop's executor. When no thread can start (out of memory, a process limit:
RuntimeError "can't start new thread"), the failure is written on the loop
instead; and if the task still ends raising, its job is let go rather than
held (its lease renewed) for as long as the worker lives. Both once left
the job `running` for good (tests/chaos/test_host_resources.py drives the
first for real, with a MemoryError under RLIMIT_AS)."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest

import pulsed
from pulsed.api import HandlerRegistry
from pulsed.db.store import Store
from pulsed.jobs import JobState
from pulsed.worker import Worker, WorkerOptions


def _registry() -> HandlerRegistry:
    registry = HandlerRegistry()

    async def fails(job: pulsed.Job) -> None:
        raise ValueError("handler failed")

    async def works(job: pulsed.Job) -> None:
        return None

    registry.register("fails", fails)
    registry.register("works", works)
    return registry


def _worker(dsn: str) -> Worker:
    return Worker(dsn, WorkerOptions(owner="w", concurrency=4), registry=_registry())


def test_a_failure_is_recorded_when_no_thread_can_start(
        dsn: str, conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_thread(self, executor, func, *args):  # type: ignore[no-untyped-def]
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(asyncio.BaseEventLoop, "run_in_executor", no_thread)
    ids = pulsed.enqueue_many(conn, [{"type": "fails", "max_attempts": 1},
                                     {"type": "works"}])
    worker = _worker(dsn)
    assert worker.run(stop_when_idle=True) == 2
    failed, done = (Store(conn).get_job(i) for i in ids)
    assert failed.state is JobState.FAILED, failed.state
    assert [(a.outcome, a.error_class) for a in failed.attempts] == [("error", "ValueError")]
    assert done.state is JobState.COMPLETED
    assert worker.ledger.held_ids() == []


def test_a_task_that_raises_lets_its_job_go(
        dsn: str, conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    worker = _worker(dsn)
    conclude = worker._conclude

    def broken(job, error, started, result=None):  # type: ignore[no-untyped-def]
        if job.type == "fails":
            raise RuntimeError("recording broke")  # before the ledger hears of it
        return conclude(job, error, started, result)

    monkeypatch.setattr(worker, "_conclude", broken)
    [job_id] = pulsed.enqueue_many(conn, [{"type": "fails"}])
    with caplog.at_level(logging.ERROR, logger="pulsed.worker"):
        worker.run(stop_when_idle=True)
    assert worker.ledger.held_ids() == []  # held, its lease was renewed for good
    assert any(f"fails#{job_id}: recording its outcome failed" in r.getMessage()
               for r in caplog.records), caplog.text
    # Its lease expires and the reaper records the attempt (not this test's).
    assert Store(conn).get_job(job_id).state is JobState.RUNNING
