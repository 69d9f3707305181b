"""Scheduling inputs at their numeric extremes meeting time arithmetic:
each is stored and read back, or refused naming the field, and no stored
value stops a worker or the scheduler."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg
import pytest

import pulsed
from pulsed.api import HandlerRegistry
from pulsed.config import CronEntry
from pulsed.db.store import Store
from pulsed.jobs import BACKOFF_CAP_S, BACKOFF_JITTER, Job, JobState
from pulsed.job_input import INT_MAX
from pulsed.leadership import Leadership
from pulsed.maintenance import CronEnqueuer

UTC = timezone.utc
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


# -- cron ticks further apart than the scheduler's look-back ----------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def enqueued_ticks(conn: psycopg.Connection, name: str) -> list[datetime]:
    prefix = f"cron:{name}:"
    keys = conn.execute("SELECT idempotency_key FROM pulse_jobs WHERE idempotency_key LIKE %s",
                        (prefix + "%",)).fetchall()
    return sorted(datetime.fromisoformat(key[len(prefix):]) for (key,) in keys)


@pytest.mark.parametrize("catch_up", [False, True])
@pytest.mark.parametrize("schedule,zone,first,missed", [
    # weekly, Mondays 03:00 UTC; the leader is back on Thursday
    ("0 3 * * 1", "UTC", datetime(2026, 11, 2, 3, tzinfo=UTC),
     datetime(2026, 11, 9, 3, tzinfo=UTC)),
    # monthly on the 1st at 00:30 in Berlin (23:30 UTC the day before)
    ("30 0 1 * *", "Europe/Berlin", datetime(2026, 9, 30, 22, 30, tzinfo=UTC),
     datetime(2026, 10, 31, 23, 30, tzinfo=UTC)),
])
def test_a_rare_tick_missed_in_an_outage_longer_than_two_days_is_enqueued_late(
        dsn: str, conn: psycopg.Connection, schedule: str, zone: str, first: datetime,
        missed: datetime, catch_up: bool) -> None:
    """catch_up "also enqueues runs missed while no leader ran", and without
    it the newest missed one still runs; the newest tick was searched only 2
    days back, so a weekly or monthly tick missed earlier was dropped."""
    store = Store(conn)
    leader = Leadership("node-a/1", 30.0)
    assert leader.refresh(store)
    clock = Clock(first + timedelta(seconds=0.5))
    cron = CronEnqueuer([CronEntry(name="rare", type="noop", schedule=schedule,
                                   timezone=zone, catch_up=catch_up)], clock=clock)
    assert cron.run_once(store, leader) == 1
    clock.now = first + timedelta(days=2)
    assert cron.run_once(store, leader) == 0
    clock.now = missed + timedelta(days=3)  # no leader from first + 2 days until now
    assert cron.run_once(store, leader) == 1
    assert cron.run_once(store, leader) == 0
    clock.now += timedelta(hours=1)
    assert cron.run_once(store, leader) == 0
    assert enqueued_ticks(conn, "rare") == [first, missed]
