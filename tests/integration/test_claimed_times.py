"""A worker's session runs in UTC (CLAIM_SESSION), so a claimed job's
created_at and run_at load without a zoneinfo conversion: handlers see the
instants stored, as UTC datetimes, whatever TimeZone the server or the
database URL asks for."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import pulsed
from pulsed.api import HandlerRegistry


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "America/New_York", "Etc/UTC"])
def test_handlers_see_the_stored_instants_in_utc(dsn: str, conn: psycopg.Connection,
                                                 zone: str) -> None:
    run_at = datetime(2001, 2, 3, 4, 5, 6, 789000, tzinfo=timezone(timedelta(hours=14)))
    ids = [pulsed.enqueue(conn, "t", {}, run_at=run_at), pulsed.enqueue(conn, "t", {})]
    seen: dict[int, tuple[datetime, datetime]] = {}
    registry = HandlerRegistry()

    def record(job: pulsed.Job) -> None:
        seen[job.id] = (job.created_at, job.run_at)

    registry.register("t", record)
    zoned = make_conninfo(dsn, options=f"-c TimeZone={zone}")
    assert pulsed.run_worker(zoned, registry=registry, prefetch=2) == 2
    for job_id in ids:
        stored = conn.execute("SELECT created_at, run_at FROM pulse_jobs WHERE id = %s",
                              (job_id,)).fetchone()
        assert seen[job_id] == stored
        assert all(value.tzinfo is timezone.utc for value in seen[job_id])
    assert seen[ids[0]][1] == run_at
