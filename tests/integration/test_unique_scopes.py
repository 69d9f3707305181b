"""Uniqueness with a scope (issue 17): unique_while="unfinished" holds an
idempotency key only until its job finishes, unique_for=S for S seconds;
without either a job holds its key until it is pruned. Racing enqueues of
one key never create two holders."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

import pulsed
from pulsed import serialize
from pulsed.api import Fail, HandlerRegistry
from pulsed.db.store import Store
from pulsed.errors import JobInputError
from pulsed.jobs import JobState
from tests.pg import wait_until

pytestmark = pytest.mark.usefixtures("fast_commits")

RACERS = 16
SHORT_PERIOD_S = 1.0  # unique_for in the tests that wait for it to pass


def holders(conn: psycopg.Connection, key: str) -> list[int]:
    """The ids of the jobs holding `key` (what the unique index covers)."""
    return [row[0] for row in conn.execute(
        "SELECT id FROM pulse_jobs WHERE idempotency_key = %s AND key_released_at IS NULL"
        " AND (unique_while IS NULL OR state NOT IN ('completed', 'failed', 'cancelled'))"
        " AND (unique_until IS NULL OR unique_until > clock_timestamp())", (key,))]


def jobs_with_key(conn: psycopg.Connection, key: str) -> int:
    return conn.execute("SELECT count(*) FROM pulse_jobs WHERE idempotency_key = %s",
                        (key,)).fetchone()[0]


def run_all(dsn: str, handler: Any = lambda job: None) -> int:
    registry = HandlerRegistry()
    registry.register("t", handler)
    return pulsed.run_worker(dsn, registry=registry)


def fail(job: Any) -> None:
    raise Fail("no")


def finish(dsn: str, conn: psycopg.Connection, job_id: int, how: str) -> None:
    if how == "cancelled":
        assert pulsed.cancel(conn, job_id)
    else:
        run_all(dsn, fail if how == "failed" else (lambda job: None))
    assert Store(conn).get_job(job_id).state.value == how


# -- unique_while -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["completed", "failed", "cancelled"])
def test_unique_while_unfinished_frees_the_key_when_its_job_finishes(
        dsn: str, conn: psycopg.Connection, how: str) -> None:
    first = pulsed.enqueue(conn, "t", {"n": 1}, idempotency_key="k", unique_while="unfinished")
    assert pulsed.enqueue(conn, "t", {"n": 2}, idempotency_key="k",
                          unique_while="unfinished") == first

    finish(dsn, conn, first, how)
    second = pulsed.enqueue(conn, "t", {"n": 3}, idempotency_key="k", unique_while="unfinished")
    again = pulsed.enqueue(conn, "t", {"n": 4}, idempotency_key="k")  # any scope meets it

    assert second != first and again == second
    assert Store(conn).get_job(second).payload == {"n": 3}
    shown = serialize.job_to_dict(Store(conn).get_job(second))
    assert (shown["unique_while"], shown["unique_until"]) == ("unfinished", None)
    assert holders(conn, "k") == [second]


def test_without_a_scope_a_finished_job_keeps_its_key(dsn: str, conn: psycopg.Connection) -> None:
    first = pulsed.enqueue(conn, "t", idempotency_key="k")
    run_all(dsn)
    assert Store(conn).get_job(first).state is JobState.COMPLETED
    assert pulsed.enqueue(conn, "t", idempotency_key="k", unique_while="unfinished") == first
    assert pulsed.enqueue_many(conn, [{"type": "t", "idempotency_key": "k"}]) == [first]


def test_enqueue_many_takes_a_key_its_unfinished_holder_released(
        dsn: str, conn: psycopg.Connection) -> None:
    done = pulsed.enqueue(conn, "t", idempotency_key="done", unique_while="unfinished")
    run_all(dsn)
    waiting = pulsed.enqueue(conn, "t", idempotency_key="waiting", unique_while="unfinished")

    ids = pulsed.enqueue_many(conn, [
        {"type": "t", "idempotency_key": "done", "unique_while": "unfinished"},
        {"type": "t", "idempotency_key": "waiting", "unique_while": "unfinished"},
        {"type": "t"},
        {"type": "t", "idempotency_key": "done", "unique_while": "unfinished"},
    ])

    assert ids[0] not in (done, waiting) and ids[1] == waiting and ids[3] == ids[0]
    assert holders(conn, "done") == [ids[0]]


def test_retrying_a_finished_job_whose_key_is_taken_runs_it_without_the_key(
        dsn: str, conn: psycopg.Connection) -> None:
    first = pulsed.enqueue(conn, "t", idempotency_key="k", unique_while="unfinished")
    run_all(dsn, fail)
    second = pulsed.enqueue(conn, "t", idempotency_key="k", unique_while="unfinished")

    assert Store(conn).retry(first)

    assert Store(conn).get_job(first).state is JobState.AVAILABLE
    assert holders(conn, "k") == [second]


# -- unique_for -----------------------------------------------------------------------


def test_unique_for_holds_the_key_for_the_period_then_a_new_job_takes_it(
        dsn: str, conn: psycopg.Connection) -> None:
    first = pulsed.enqueue(conn, "t", {"n": 1}, idempotency_key="k", unique_for=SHORT_PERIOD_S)
    run_all(dsn)  # finished, but the period is not over
    assert pulsed.enqueue(conn, "t", idempotency_key="k", unique_for=SHORT_PERIOD_S) == first

    second = wait_until(
        lambda: (job_id := pulsed.enqueue(conn, "t", {"n": 2}, idempotency_key="k",
                                          unique_for=SHORT_PERIOD_S)) != first and job_id,
        message="the key to be free once unique_for has passed")

    assert pulsed.enqueue(conn, "t", idempotency_key="k") == second
    assert Store(conn).get_job(second).payload == {"n": 2}
    assert jobs_with_key(conn, "k") == 2
    old, new = Store(conn).get_job(first), Store(conn).get_job(second)
    assert old.key_released_at is not None and new.key_released_at is None
    assert new.unique_until > old.unique_until and new.unique_while is None


def test_enqueue_many_takes_a_key_whose_period_is_over(conn: psycopg.Connection) -> None:
    first = pulsed.enqueue(conn, "t", idempotency_key="k", unique_for=SHORT_PERIOD_S)
    wait_until(lambda: not holders(conn, "k"), message="unique_for to pass")

    ids = pulsed.enqueue_many(conn, [{"type": "t", "idempotency_key": "k"},
                                     {"type": "t", "idempotency_key": "k"}])

    assert ids[0] == ids[1] != first
    assert holders(conn, "k") == [ids[0]]


def test_a_unique_for_job_is_not_pruned_before_its_period_ends(
        dsn: str, conn: psycopg.Connection) -> None:
    first = pulsed.enqueue(conn, "t", idempotency_key="k", unique_for=3600)
    run_all(dsn)
    assert Store(conn).prune_finished("completed", retention=0) == 0
    assert pulsed.enqueue(conn, "t", idempotency_key="k") == first


# -- racing enqueues ------------------------------------------------------------------


def _race(dsn: str, scope: dict[str, Any], *, bulk: bool = False) -> list[int]:
    """RACERS threads enqueue key "k" at once, each in its own transaction."""
    barrier = threading.Barrier(RACERS)

    def enqueue_one(index: int) -> int:
        with psycopg.connect(dsn) as conn:
            barrier.wait()
            if bulk and index % 2:
                job_id = pulsed.enqueue_many(conn, [{"type": "t", "idempotency_key": "k",
                                                     **scope}])[0]
            else:
                job_id = pulsed.enqueue(conn, "t", {"racer": index}, idempotency_key="k",
                                        **scope)
            conn.commit()
            return job_id

    with ThreadPoolExecutor(RACERS) as pool:
        return list(pool.map(enqueue_one, range(RACERS)))


@pytest.mark.parametrize("bulk", [False, True], ids=["enqueue", "mixed-enqueue_many"])
def test_racing_unique_while_enqueues_after_the_holder_finished_create_one_job(
        dsn: str, conn: psycopg.Connection, bulk: bool) -> None:
    scope = {"unique_while": "unfinished"}
    old = pulsed.enqueue(conn, "t", idempotency_key="k", **scope)
    run_all(dsn)

    ids = _race(dsn, scope, bulk=bulk)

    assert len(set(ids)) == 1 and ids[0] != old
    assert holders(conn, "k") == ids[:1]
    assert jobs_with_key(conn, "k") == 2


@pytest.mark.parametrize("bulk", [False, True], ids=["enqueue", "mixed-enqueue_many"])
def test_racing_unique_for_enqueues_after_the_period_create_one_job(
        conn: psycopg.Connection, dsn: str, bulk: bool) -> None:
    scope = {"unique_for": SHORT_PERIOD_S}
    old = pulsed.enqueue(conn, "t", idempotency_key="k", **scope)
    wait_until(lambda: not holders(conn, "k"), message="unique_for to pass")

    ids = _race(dsn, {"unique_for": 3600}, bulk=bulk)

    assert len(set(ids)) == 1 and ids[0] != old
    assert holders(conn, "k") == ids[:1]
    assert jobs_with_key(conn, "k") == 2


@pytest.mark.parametrize("scope", [{"unique_while": "unfinished"}, {"unique_for": 3600}])
def test_racing_enqueues_of_a_new_key_create_one_job(
        conn: psycopg.Connection, dsn: str, scope: dict[str, Any]) -> None:
    ids = _race(dsn, scope)
    assert len(set(ids)) == 1
    assert jobs_with_key(conn, "k") == 1


# -- validation -----------------------------------------------------------------------


@pytest.mark.parametrize("options, argument", [
    ({"unique_while": "unfinished"}, "unique_while"),
    ({"unique_for": 60}, "unique_for"),
    ({"idempotency_key": "k", "unique_while": "finished"}, "unique_while"),
    ({"idempotency_key": "k", "unique_for": 0}, "unique_for"),
    ({"idempotency_key": "k", "unique_for": "60"}, "unique_for"),
    ({"idempotency_key": "k", "unique_for": float("inf")}, "unique_for"),
    ({"idempotency_key": "k", "unique_while": "unfinished", "unique_for": 60}, "unique_for"),
])
def test_bad_unique_options_are_refused_naming_the_argument(
        conn: psycopg.Connection, options: dict[str, Any], argument: str) -> None:
    with pytest.raises(JobInputError) as raised:
        pulsed.enqueue(conn, "t", **options)
    assert raised.value.argument == argument
    with pytest.raises(JobInputError) as raised:
        pulsed.enqueue_many(conn, [{"type": "t"}, {"type": "t", **options}])
    assert raised.value.argument == f"jobs[1].{argument}"
    assert jobs_with_key(conn, "k") == 0
