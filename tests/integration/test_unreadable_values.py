"""Rows holding values PostgreSQL stores but Python cannot read (issue 23,
item 2): a timestamp before year 1 or after 9999, or infinite, a JSON
number past Python's digit limit. Written by SQL directly or by a Pulse
from before the bounds at the door. A claim that gets one fails that job
with a clear error and runs every other job; listing and showing jobs
show it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import pulsed
from pulsed.api import HandlerRegistry
from pulsed.db.store import UNREADABLE_ERROR_CLASS, Store, TypeLimit
from pulsed.http import ApiServer
from pulsed.jobs import JobState, Unreadable
from pulsed.serialize import job_to_dict
from pulsectl.cli import main as pulsectl_main
from tests.integration.test_http_api import Client, make_config
from tests.integration.test_pulsectl import write_config

GOOD_JOBS = 100
# Generous for two shared cores: before the fix, the worker died on the
# first claim (and under pulsed, every worker crash-looped in backoff).
QUICKLY_S = 15.0

# (what is wrong, the column, SQL for the row's values: type, run_at,
# created_at, payload)
BAD_ROWS = [
    ("run_at year 1 BC", "run_at",
     "'t', '0001-12-31 10:00:00+00 BC', now(), '{}'"),
    ("run_at year 10000", "run_at",
     "'t', '10000-01-01 00:00:00+00', now(), '{}'"),
    ("run_at -infinity, a limited type", "run_at",
     "'limited', '-infinity', now(), '{}'"),
    ("created_at infinity", "created_at",
     "'t', now(), 'infinity', '{}'"),
    ("a 5,000-digit number in the payload", "payload",
     "'t', now(), now(), ('{\"n\": ' || repeat('9', 5000) || '}')::jsonb"),
]


def insert_raw(conn: psycopg.Connection, values: str, state: str = "available") -> int:
    return conn.execute(
        f"INSERT INTO pulse_jobs (type, run_at, created_at, payload, state) "
        f"VALUES ({values}, '{state}') RETURNING id").fetchone()[0]


@pytest.fixture
def bad_jobs(conn: psycopg.Connection) -> dict[int, str]:
    """Each bad row, inserted by SQL directly, available: job id -> column."""
    return {insert_raw(conn, values): column for _what, column, values in BAD_ROWS}


def test_a_worker_fails_unreadable_jobs_and_runs_every_other(
        dsn: str, conn: psycopg.Connection, bad_jobs: dict[int, str]) -> None:
    good = pulsed.enqueue_many(conn, [{"type": "t", "payload": {"i": i}}
                                      for i in range(GOOD_JOBS - 10)])
    good += pulsed.enqueue_many(conn, [{"type": "limited"} for _ in range(10)])
    ran: list[int] = []
    registry = HandlerRegistry()
    registry.register("t", lambda job: ran.append(job.id))
    registry.register("limited", lambda job: ran.append(job.id))

    started = time.monotonic()
    # A real worker: the plain claim and the limited types' claim function.
    done = pulsed.run_worker(dsn, registry=registry, prefetch=20,
                             limits=(TypeLimit("limited", concurrency=3),))
    took = time.monotonic() - started
    print(f"unreadable values: {len(bad_jobs)} bad rows failed, {done} jobs ran "
          f"in {took:.2f}s")

    assert sorted(ran) == sorted(good)
    assert took < QUICKLY_S
    store = Store(conn)
    for job_id in good:
        assert store.get_job(job_id, with_attempts=False).state is JobState.COMPLETED
    for job_id, column in bad_jobs.items():
        record = store.get_job(job_id)
        assert record.state is JobState.FAILED, (job_id, record)
        assert column in record.last_error and "cannot be read" in record.last_error
        [attempt] = record.attempts
        assert (attempt.outcome, attempt.error_class) == ("error", UNREADABLE_ERROR_CLASS)
        assert attempt.error_message == record.last_error


def test_unreadable_jobs_claimed_with_completions_in_one_statement(
        dsn: str, conn: psycopg.Connection) -> None:
    """Without type limits, a claim after a batch goes with its completions
    as one statement (job_complete_and_claim), whose rows start with two
    other columns: an unreadable job claimed there fails the same way."""
    good = pulsed.enqueue_many(conn, [{"type": "t", "payload": {"i": i}} for i in range(30)])
    bad = {insert_raw(conn, values): column for _what, column, values in BAD_ROWS
           if "limited" not in values}
    conn.commit()
    ran: list[int] = []
    registry = HandlerRegistry()
    registry.register("t", lambda job: ran.append(job.id))
    pulsed.run_worker(dsn, registry=registry, prefetch=5)
    assert sorted(ran) == sorted(good)
    store = Store(conn)
    for job_id, column in bad.items():
        record = store.get_job(job_id)
        assert record.state is JobState.FAILED, (job_id, record)
        assert column in record.last_error and "cannot be read" in record.last_error


def test_the_error_names_the_stored_value(dsn: str, conn: psycopg.Connection) -> None:
    job_id = insert_raw(conn, BAD_ROWS[0][2])
    registry = HandlerRegistry()
    registry.register("t", lambda job: None)  # a worker claims only the types it handles
    pulsed.run_worker(dsn, registry=registry)
    last_error = Store(conn).get_job(job_id).last_error
    assert "run_at '0001-12-31 10:00:00+00 BC'" in last_error, last_error
    assert "before year 1" in last_error


def test_listing_and_showing_jobs_show_unreadable_values(
        conn: psycopg.Connection, bad_jobs: dict[int, str]) -> None:
    store = Store(conn)
    listed = {record.id: record for record in store.list_jobs(limit=100)}
    assert set(bad_jobs) <= set(listed)
    year_1_bc = next(iter(bad_jobs))
    shown = store.get_job(year_1_bc)
    assert isinstance(shown.run_at, Unreadable)
    assert shown.run_at == "0001-12-31 10:00:00+00 BC" and shown.run_at.column == "run_at"
    assert job_to_dict(shown)["run_at"] == "0001-12-31 10:00:00+00 BC"
    for job_id in bad_jobs:
        job_to_dict(listed[job_id])  # every shape renders


@pytest.fixture
def config_file(dsn: str, tmp_path: Path) -> Path:
    return write_config(tmp_path / "pulse.toml", dsn)


def pulsectl(capsys: pytest.CaptureFixture[str], config_file: Path, *argv: str
             ) -> tuple[int, str]:
    code = pulsectl_main(["--config", str(config_file), *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return code, out


def test_pulsectl_jobs_and_job_show_unreadable_values(
        capsys: pytest.CaptureFixture[str], config_file: Path,
        bad_jobs: dict[int, str]) -> None:
    year_1_bc, year_10000 = list(bad_jobs)[:2]
    _code, table = pulsectl(capsys, config_file, "jobs")
    assert str(year_1_bc) in table and str(year_10000) in table
    _code, listed = pulsectl(capsys, config_file, "jobs", "--json")
    assert "0001-12-31 10:00:00+00 BC" in listed and "10000-01-01" in listed
    for job_id in bad_jobs:
        _code, shown = pulsectl(capsys, config_file, "job", str(job_id))
        assert str(job_id) in shown
    _code, shown = pulsectl(capsys, config_file, "--json", "job", str(year_10000))
    assert '"run_at": "10000-01-01 00:00:00+00"' in shown


@pytest.fixture
def client(dsn: str) -> Iterator[Client]:
    with ApiServer(make_config(), dsn) as server:
        yield Client(server.url)


def test_the_http_api_lists_and_shows_unreadable_values(
        client: Client, bad_jobs: dict[int, str]) -> None:
    reply = client.get("/jobs")
    assert reply.status == 200, reply.body
    by_id = {job["id"]: job for job in reply.json["jobs"]}
    assert set(bad_jobs) <= set(by_id)
    year_1_bc = next(iter(bad_jobs))
    assert by_id[year_1_bc]["run_at"] == "0001-12-31 10:00:00+00 BC"
    for job_id in bad_jobs:
        reply = client.get(f"/jobs/{job_id}")
        assert reply.status == 200, reply.body
        assert reply.json["id"] == job_id


def test_queue_ages_survive_an_infinite_run_at(conn: psycopg.Connection) -> None:
    insert_raw(conn, "'t', '-infinity', now(), '{}'")
    store = Store(conn)
    assert store.oldest_available_age() is None
    assert [(r["type"], r["state"], r["count"]) for r in store.queue_ages()] == [
        ("t", "available", 1)]
