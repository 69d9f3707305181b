"""Scheduling inputs at their numeric extremes meeting time arithmetic:
each is stored and read back, or refused naming the field, and no stored
value stops a worker or the scheduler."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest

import pulsed
from pulsed.api import HandlerRegistry
from pulsed.db.store import Store
from pulsed.jobs import BACKOFF_CAP_S, BACKOFF_JITTER, Job, JobState
from pulsed.job_input import INT_MAX

pytestmark = pytest.mark.usefixtures("fast_commits")


def boom(job: Job) -> None:
    raise ValueError(f"boom on attempt {job.attempt}")


@pytest.mark.parametrize("attempt", [1025, 5000, INT_MAX - 1])
def test_a_failure_at_a_large_attempt_number_is_retried_after_the_capped_backoff(
        dsn: str, conn: psycopg.Connection, attempt: int) -> None:
    """max_attempts goes up to 2**31-1; 2.0 * 2**1024 does not fit a float,
    so the worker's backoff must cap the exponent as the SQL one does."""
    job_id = pulsed.enqueue(conn, "boom", max_attempts=INT_MAX)
    conn.execute("UPDATE pulse_jobs SET attempt = %s WHERE id = %s", (attempt - 1, job_id))
    registry = HandlerRegistry()
    registry.register("boom", boom)

    assert pulsed.run_worker(dsn, registry=registry, owner="w") == 1

    record = Store(conn).get_job(job_id)
    assert record.state is JobState.RETRYABLE
    assert record.attempt == attempt
    [recorded] = record.attempts
    assert (recorded.attempt, recorded.outcome, recorded.error_class) == (
        attempt, "error", "ValueError")
    wait = record.run_at - recorded.finished_at
    assert timedelta(seconds=BACKOFF_CAP_S * (1 - BACKOFF_JITTER) - 1) <= wait \
        <= timedelta(seconds=BACKOFF_CAP_S * (1 + BACKOFF_JITTER) + 1)
