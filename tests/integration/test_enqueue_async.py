"""pulsed.enqueue_async and enqueue_many_async on a real psycopg
AsyncConnection: in the caller's transaction (commit keeps, rollback
drops), the same checks and errors as the sync calls (every case of
test_jobs_validation), and the same idempotency rules."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import psycopg
import pytest

import pulsed
from pulsed.db.store import Store
from tests.integration.test_jobs_validation import BAD_INPUTS, GOOD
from tests.pg import create_database, drop_database, unique_name

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def count_jobs(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pulse_jobs").fetchone()[0]


@pytest.fixture(scope="module")
def shared_dsn(admin_dsn: str, template_db: str) -> Iterator[str]:
    """The validation cases write nothing (each checks the count): they share a database."""
    name = unique_name("pulse_test_async")
    dsn = create_database(admin_dsn, name, template=template_db)
    yield dsn
    drop_database(admin_dsn, name)


def test_enqueue_async_commits_with_the_callers_transaction(dsn: str, conn: psycopg.Connection
                                                             ) -> None:
    async def enqueue_and_commit() -> int:
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            job_id = await pulsed.enqueue_async(aconn, "email", {"to": "a@example.com"},
                                                priority=3, queue="mail")
            # Not visible to others before the caller commits.
            assert count_jobs(conn) == 0
            await aconn.commit()
            return job_id

    job_id = run(enqueue_and_commit())
    job = Store(conn).get_job(job_id)
    assert (job.type, job.queue, job.priority, dict(job.payload)) == (
        "email", "mail", 3, {"to": "a@example.com"})
    assert job.state == pulsed.JobState.AVAILABLE


def test_enqueue_async_rolls_back_with_the_callers_transaction(dsn: str, conn: psycopg.Connection
                                                               ) -> None:
    async def enqueue_and_roll_back() -> list[int]:
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            ids = [await pulsed.enqueue_async(aconn, "t")]
            ids += await pulsed.enqueue_many_async(aconn, [{"type": "t"}, {"type": "u"}])
            await aconn.rollback()
            return ids

    ids = run(enqueue_and_roll_back())
    assert len(set(ids)) == 3
    assert count_jobs(conn) == 0


def test_enqueue_many_async_returns_ids_in_input_order(dsn: str, conn: psycopg.Connection
                                                       ) -> None:
    async def enqueue() -> list[int]:
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            ids = await pulsed.enqueue_many_async(
                aconn, [{"type": "t", "payload": {"i": i}} for i in range(50)])
            await aconn.commit()
            assert await pulsed.enqueue_many_async(aconn, []) == []
            return ids

    ids = run(enqueue())
    store = Store(conn)
    assert [store.get_job(job_id).payload["i"] for job_id in ids] == list(range(50))


def test_idempotency_keys_hold_across_sync_and_async(dsn: str, conn: psycopg.Connection) -> None:
    sync_id = pulsed.enqueue(conn, "t", idempotency_key="k1")

    async def enqueue() -> tuple[int, list[int], int]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            again = await pulsed.enqueue_async(aconn, "t", idempotency_key="k1")
            batch = await pulsed.enqueue_many_async(aconn, [
                {"type": "t", "idempotency_key": "k1"}, {"type": "t", "idempotency_key": "k2"},
                {"type": "t", "idempotency_key": "k2"}, {"type": "t"}])
            scoped = await pulsed.enqueue_async(aconn, "t", idempotency_key="k3",
                                                unique_while="unfinished")
            return again, batch, scoped

    again, batch, scoped = run(enqueue())
    assert again == sync_id
    assert batch[0] == sync_id and batch[1] == batch[2] and batch[3] not in (batch[1], sync_id)
    assert pulsed.enqueue(conn, "t", idempotency_key="k3", unique_while="unfinished") == scoped
    assert count_jobs(conn) == 4  # k1, k2, the keyless one, k3


def test_unique_for_expired_holder_is_released_on_async(dsn: str, conn: psycopg.Connection
                                                        ) -> None:
    """The release-and-insert-again round of the shared steps, awaited."""
    first = pulsed.enqueue(conn, "t", idempotency_key="k", unique_for=0.05)
    conn.execute("SELECT pg_sleep(0.1)")  # the database's clock decides expiry

    async def enqueue() -> tuple[int, list[int]]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            single = await pulsed.enqueue_async(aconn, "t", idempotency_key="k",
                                                unique_for=0.05)
            await aconn.execute("SELECT pg_sleep(0.1)")
            many = await pulsed.enqueue_many_async(
                aconn, [{"type": "t", "idempotency_key": "k", "unique_for": 60}])
            return single, many

    single, many = run(enqueue())
    assert len({first, single, many[0]}) == 3


@pytest.mark.parametrize(("overrides", "argument"),
                         [pytest.param(o, a, id=name) for name, o, a in BAD_INPUTS])
def test_async_refuses_bad_input_as_sync_does(shared_dsn: str, overrides: dict[str, Any],
                                              argument: str) -> None:
    """The same JobInputError (argument and message) as enqueue and
    enqueue_many, nothing written, the caller's transaction still usable."""
    params = {**GOOD, **overrides}
    batch = [GOOD, params, GOOD]
    with psycopg.connect(shared_dsn) as sync_conn:
        with pytest.raises(pulsed.JobInputError) as sync_single:
            pulsed.enqueue(sync_conn, **params)
        with pytest.raises(pulsed.JobInputError) as sync_many:
            pulsed.enqueue_many(sync_conn, batch)
        before = count_jobs(sync_conn)
        sync_conn.rollback()

    async def attempt() -> tuple[BaseException, BaseException]:
        async with await psycopg.AsyncConnection.connect(shared_dsn) as aconn:
            await pulsed.enqueue_async(aconn, "kept")
            with pytest.raises(pulsed.JobInputError) as single:
                await pulsed.enqueue_async(aconn, **params)
            with pytest.raises(pulsed.JobInputError) as many:
                await pulsed.enqueue_many_async(aconn, batch)
            await aconn.execute("SELECT 1")  # the transaction is still usable
            await aconn.rollback()
            return single.value, many.value

    single, many = run(attempt())
    assert (single.argument, str(single)) == (sync_single.value.argument, str(sync_single.value))
    assert (many.argument, str(many)) == (sync_many.value.argument, str(sync_many.value))
    assert single.argument == argument and many.argument == f"jobs[1].{argument}"
    with psycopg.connect(shared_dsn) as check:
        assert count_jobs(check) == before


def test_the_wrong_kind_of_connection_is_named(dsn: str, conn: psycopg.Connection) -> None:
    async def mixed() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            with pytest.raises(TypeError, match="enqueue_async"):
                pulsed.enqueue(aconn, "t")  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="enqueue_async"):
                pulsed.enqueue_many(aconn, [GOOD])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"pulsed\.enqueue"):
            await pulsed.enqueue_async(conn, "t")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="AsyncConnection.*got str"):
            await pulsed.enqueue_many_async("postgresql://", [GOOD])  # type: ignore[arg-type]

    run(mixed())
    with pytest.raises(TypeError, match="got str"):
        pulsed.enqueue("postgresql://", "t")  # type: ignore[arg-type]
    assert count_jobs(conn) == 0
