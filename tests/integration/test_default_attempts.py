"""A job enqueued without max_attempts gets pulsed.jobs.DEFAULT_MAX_ATTEMPTS
at its first claim, on both claim paths (plain and type-limited): the
Python constant is the one source, the SQL takes it as a parameter."""

from __future__ import annotations

import psycopg
import pytest

import pulsed
from pulsed.db import store_worker as store_module
from pulsed.db.store import Store, TypeLimit
from pulsed.jobs import DEFAULT_MAX_ATTEMPTS

pytestmark = pytest.mark.usefixtures("fast_commits")


@pytest.mark.parametrize("fallback", [DEFAULT_MAX_ATTEMPTS, 7])
@pytest.mark.parametrize("limited", [False, True], ids=["plain", "limited"])
def test_a_job_without_max_attempts_gets_the_python_default(
        conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch, fallback: int,
        limited: bool) -> None:
    # 7: a value no SQL literal holds, so only the Python side can supply it.
    monkeypatch.setattr(store_module, "DEFAULT_MAX_ATTEMPTS", fallback)
    job_id = pulsed.enqueue(conn, "defaulted")
    configured = pulsed.enqueue(conn, "defaulted", max_attempts=3)
    limits = (TypeLimit("defaulted", concurrency=5),) if limited else ()
    store = Store(conn)
    # A concurrency-limited type is claimed one job per claim.
    jobs = [job for _ in range(2)
            for job in store.claim(owner="test", limit=10, lease_ttl=30.0, limits=limits)]
    assert {job.id: job.max_attempts for job in jobs} == {job_id: fallback, configured: 3}


def test_a_types_own_default_wins_over_the_fallback(conn: psycopg.Connection) -> None:
    job_id = pulsed.enqueue(conn, "typed")
    jobs = Store(conn).claim(owner="test", limit=10, lease_ttl=30.0,
                             limits=(TypeLimit("typed", concurrency=5),),
                             default_attempts={"typed": 4})
    assert [(job.id, job.max_attempts) for job in jobs] == [(job_id, 4)]


def test_the_api_quotes_the_same_constant() -> None:
    assert pulsed.api.DEFAULT_MAX_ATTEMPTS is DEFAULT_MAX_ATTEMPTS
