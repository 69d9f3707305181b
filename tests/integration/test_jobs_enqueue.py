"""Enqueue against a real PostgreSQL: transactions, idempotency, bulk insert,
scheduling, claim order and queue filters (SPEC §3 "Enqueue", "Idempotency",
"Claim")."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Callable

import psycopg
import pytest

import pulsed
from pulsed.api import HandlerRegistry
from pulsed.db.store import Store
from pulsed.jobs import JobState
from tests.pg import wait_until

pytestmark = pytest.mark.usefixtures("fast_commits")




def count_jobs(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pulse_jobs").fetchone()[0]


def db_now(conn: psycopg.Connection) -> datetime:
    return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def counting_registry(job_type: str = "t") -> tuple[HandlerRegistry, list[int]]:
    calls: list[int] = []
    registry = HandlerRegistry()
    registry.register(job_type, lambda job: calls.append(job.id))
    return registry, calls


# -- the caller's transaction ----------------------------------------------------


def test_enqueue_in_a_rolled_back_transaction_never_exists(dsn: str, conn: psycopg.Connection) -> None:
    with psycopg.connect(dsn) as app:
        job_id = pulsed.enqueue(app, "t", {"n": 1})
        app.rollback()

    assert count_jobs(conn) == 0
    assert Store(conn).get_job(job_id) is None
    registry, calls = counting_registry()
    assert pulsed.run_worker(dsn, registry=registry) == 0
    assert calls == []


def test_enqueue_in_a_committed_transaction_runs_exactly_once(dsn: str, conn: psycopg.Connection) -> None:
    with psycopg.connect(dsn) as app:
        app.execute("CREATE TABLE app_orders (id int)")  # the application's own work
        app.execute("INSERT INTO app_orders VALUES (1)")
        job_id = pulsed.enqueue(app, "t", {"order": 1})
        # Not visible to anyone else before the commit.
        assert Store(conn).get_job(job_id) is None
        app.commit()

    assert isinstance(job_id, int)
    assert Store(conn).get_job(job_id).state is JobState.AVAILABLE
    registry, calls = counting_registry()
    assert pulsed.run_worker(dsn, registry=registry) == 1
    assert pulsed.run_worker(dsn, registry=registry) == 0  # nothing left to run
    assert calls == [job_id]
    record = Store(conn).get_job(job_id)
    assert record.state is JobState.COMPLETED
    assert record.attempt == 1


# -- idempotency -------------------------------------------------------------------


def test_same_idempotency_key_returns_the_same_id(conn: psycopg.Connection) -> None:
    first = pulsed.enqueue(conn, "t", {"n": 1}, idempotency_key="order-1")
    second = pulsed.enqueue(conn, "t", {"n": 2}, idempotency_key="order-1")
    other = pulsed.enqueue(conn, "t", {"n": 3}, idempotency_key="order-2")

    assert first == second
    assert other != first
    assert count_jobs(conn) == 2
    assert Store(conn).get_job(first).payload == {"n": 1}  # the first one is kept


def test_same_idempotency_key_within_one_enqueue_many(conn: psycopg.Connection) -> None:
    ids = pulsed.enqueue_many(conn, [
        {"type": "t", "payload": {"i": 0}, "idempotency_key": "k"},
        {"type": "t", "payload": {"i": 1}},
        {"type": "t", "payload": {"i": 2}, "idempotency_key": "k"},
        {"type": "t", "payload": {"i": 3}, "idempotency_key": "other"},
    ])

    assert len(ids) == 4
    assert ids[0] == ids[2]
    assert len(set(ids)) == 3
    assert count_jobs(conn) == 3
    assert Store(conn).get_job(ids[0]).payload == {"i": 0}


def test_same_idempotency_key_across_enqueue_and_enqueue_many(conn: psycopg.Connection) -> None:
    single = pulsed.enqueue(conn, "t", {"via": "enqueue"}, idempotency_key="k1")
    ids = pulsed.enqueue_many(conn, [
        {"type": "t", "payload": {"via": "many"}},
        {"type": "t", "payload": {"via": "many"}, "idempotency_key": "k1"},
        {"type": "t", "payload": {"via": "many"}, "idempotency_key": "k2"},
    ])
    again = pulsed.enqueue(conn, "t", {"via": "enqueue again"}, idempotency_key="k2")

    assert ids[1] == single
    assert again == ids[2]
    assert count_jobs(conn) == 3
    assert Store(conn).get_job(single).payload == {"via": "enqueue"}


def _enqueue_with_key(conn: psycopg.Connection, via: str, payload: dict) -> int:
    if via == "enqueue":
        return pulsed.enqueue(conn, "t", payload, idempotency_key="shared")
    return pulsed.enqueue_many(conn, [{"type": "t", "payload": payload,
                                       "idempotency_key": "shared"}])[0]


def _second_transaction(dsn: str, via: str) -> int:
    with psycopg.connect(dsn, application_name="pulse-test-second") as second:
        job_id = _enqueue_with_key(second, via, {"from": "second"})
        second.commit()
        return job_id


def _second_is_waiting_on_a_lock(conn: psycopg.Connection) -> bool:
    return bool(conn.execute(
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pulse-test-second'"
        " AND datname = current_database() AND wait_event_type = 'Lock'").fetchone())


@pytest.mark.parametrize("via", ["enqueue", "enqueue_many"])
def test_concurrent_same_key_waits_for_the_first_and_returns_its_id(
        dsn: str, conn: psycopg.Connection, via: str) -> None:
    with psycopg.connect(dsn) as first, ThreadPoolExecutor(1) as pool:
        first_id = _enqueue_with_key(first, "enqueue", {"from": "first"})
        pending = pool.submit(_second_transaction, dsn, via)
        wait_until(lambda: _second_is_waiting_on_a_lock(conn),
                   message="the second enqueue to wait for the first transaction")
        assert not pending.done()
        first.commit()
        second_id = pending.result(timeout=10)

    assert second_id == first_id
    assert count_jobs(conn) == 1
    assert Store(conn).get_job(first_id).payload == {"from": "first"}


@pytest.mark.parametrize("via", ["enqueue", "enqueue_many"])
def test_concurrent_same_key_creates_the_job_when_the_first_rolls_back(
        dsn: str, conn: psycopg.Connection, via: str) -> None:
    with psycopg.connect(dsn) as first, ThreadPoolExecutor(1) as pool:
        first_id = _enqueue_with_key(first, "enqueue", {"from": "first"})
        pending = pool.submit(_second_transaction, dsn, via)
        wait_until(lambda: _second_is_waiting_on_a_lock(conn),
                   message="the second enqueue to wait for the first transaction")
        first.rollback()
        second_id = pending.result(timeout=10)

    assert second_id != first_id
    assert count_jobs(conn) == 1
    assert Store(conn).get_job(first_id) is None
    record = Store(conn).get_job(second_id)
    assert record.payload == {"from": "second"}
    assert record.idempotency_key == "shared"


# -- enqueue_many --------------------------------------------------------------------


def test_enqueue_many_returns_ids_in_input_order(conn: psycopg.Connection) -> None:
    specs = [{"type": f"t{i % 3}", "payload": {"i": i}, "priority": (7 * i) % 11 - 5}
             for i in range(50)]
    ids = pulsed.enqueue_many(conn, (spec for spec in specs))  # any iterable

    assert len(ids) == 50 and len(set(ids)) == 50
    stored = {row[0]: (row[1], row[2], row[3]) for row in conn.execute(
        "SELECT id, (payload->>'i')::int, type, priority FROM pulse_jobs")}
    for i, job_id in enumerate(ids):
        assert stored[job_id] == (i, f"t{i % 3}", (7 * i) % 11 - 5)


def test_enqueue_many_stores_optional_fields_set_on_some_items_only(
        conn: psycopg.Connection) -> None:
    # A column no item sets goes to the database as one NULL, not an array of
    # NULLs: a column set on some items only must still land on the right rows.
    specs = [{"type": "t", "payload": {"i": i}} for i in range(6)]
    specs[1]["max_attempts"] = 3
    specs[4]["timeout"] = 2.5
    specs[5]["idempotency_key"] = "only-me"
    ids = pulsed.enqueue_many(conn, specs)
    rows = {row[0]: row[1:] for row in conn.execute(
        "SELECT id, max_attempts, timeout_s, idempotency_key FROM pulse_jobs")}
    assert [rows[job_id] for job_id in ids] == [
        (None, None, None), (3, None, None), (None, None, None), (None, None, None),
        (None, 2.5, None), (None, None, "only-me")]
    unset = pulsed.enqueue_many(conn, [{"type": "t"}, {"type": "t"}])
    assert [row for row in conn.execute(
        "SELECT max_attempts, timeout_s, idempotency_key, state FROM pulse_jobs "
        "WHERE id = ANY(%s) ORDER BY id", (unset,))] == [(None, None, None, "available")] * 2


def test_a_single_enqueue_wakes_workers_once_and_only_for_a_new_job_that_can_run(
        dsn: str) -> None:
    """job_insert sends its NOTIFY from RETURNING: once for the row it
    inserts, never when a held key makes it insert nothing."""
    past = datetime.now(timezone.utc) - timedelta(minutes=5)
    assert notifications(dsn, lambda c: pulsed.enqueue(c, "t", idempotency_key="k")) \
        == ["default"]
    assert notifications(dsn, lambda c: pulsed.enqueue(c, "t", idempotency_key="k")) == []
    assert notifications(dsn, lambda c: pulsed.enqueue(c, "t", run_at=past)) == ["default"]
    assert notifications(dsn, lambda c: [pulsed.enqueue(c, "t", queue=q)
                                         for q in ["a", "b", "a"]]) == ["a", "b"]


def test_only_a_batch_with_idempotency_keys_pays_for_on_conflict() -> None:
    from pulsed.db.store_enqueue import _bulk_insert_sql

    keyed, keyless = _bulk_insert_sql(keyed=True), _bulk_insert_sql(keyed=False)
    assert "ON CONFLICT" in keyed and "ON CONFLICT" not in keyless
    assert "RETURNING id, idempotency_key" in keyless and "pg_notify" in keyless


def test_enqueue_many_of_nothing_writes_nothing(conn: psycopg.Connection) -> None:
    assert pulsed.enqueue_many(conn, []) == []
    assert count_jobs(conn) == 0


def test_enqueue_many_inserts_10000_jobs_in_one_call_quickly(conn: psycopg.Connection) -> None:
    specs = [{"type": "bulk", "payload": {"i": i}} for i in range(10_000)]

    started = time.monotonic()
    ids = pulsed.enqueue_many(conn, specs)
    elapsed = time.monotonic() - started

    assert len(ids) == 10_000 and len(set(ids)) == 10_000
    assert count_jobs(conn) == 10_000
    mismatched = conn.execute(
        "SELECT count(*) FROM pulse_jobs j JOIN unnest(%s::bigint[]) WITH ORDINALITY AS u(id, n)"
        " ON u.id = j.id WHERE (j.payload->>'i')::int <> u.n - 1", (ids,)).fetchone()[0]
    assert mismatched == 0
    assert elapsed < 5, f"enqueue_many of 10,000 jobs took {elapsed:.2f}s"


def test_enqueue_many_in_a_rolled_back_transaction_never_exists(dsn: str, conn: psycopg.Connection) -> None:
    with psycopg.connect(dsn) as app:
        pulsed.enqueue_many(app, [{"type": "t"} for _ in range(5)])
        app.rollback()
    assert count_jobs(conn) == 0


# -- scheduling ---------------------------------------------------------------------


def test_run_at_in_the_future_is_scheduled_and_not_claimed_until_promoted(conn: psycopg.Connection) -> None:
    store = Store(conn)
    run_at = db_now(conn) + timedelta(hours=1)
    job_id = pulsed.enqueue(conn, "t", run_at=run_at)

    record = store.get_job(job_id)
    assert record.state is JobState.SCHEDULED
    assert record.run_at == run_at
    assert store.claim(owner="w", limit=10, lease_ttl=30) == []
    assert store.promote_due() == []  # not due yet
    assert store.promote_due(now=run_at - timedelta(seconds=1)) == []
    assert store.get_job(job_id).state is JobState.SCHEDULED

    promoted = store.promote_due(now=run_at + timedelta(seconds=1))
    assert [p["id"] for p in promoted] == [job_id]
    assert store.get_job(job_id).state is JobState.AVAILABLE
    assert [j.id for j in store.claim(owner="w", limit=10, lease_ttl=30)] == [job_id]


def test_delay_schedules_the_job_that_many_seconds_ahead(conn: psycopg.Connection) -> None:
    store = Store(conn)
    before = db_now(conn)
    job_id = pulsed.enqueue(conn, "t", delay=3600)
    after = db_now(conn)

    record = store.get_job(job_id)
    assert record.state is JobState.SCHEDULED
    assert before + timedelta(seconds=3600) <= record.run_at <= after + timedelta(seconds=3600)
    assert store.claim(owner="w", limit=10, lease_ttl=30) == []
    assert store.promote_due() == []
    store.promote_due(now=record.run_at + timedelta(seconds=1))
    assert [j.id for j in store.claim(owner="w", limit=10, lease_ttl=30)] == [job_id]


def test_no_delay_a_zero_delay_or_a_past_run_at_is_available_at_once(conn: psycopg.Connection) -> None:
    past = db_now(conn) - timedelta(minutes=5)
    ids = [pulsed.enqueue(conn, "t"), pulsed.enqueue(conn, "t", delay=0),
           pulsed.enqueue(conn, "t", run_at=past)]
    store = Store(conn)
    assert [store.get_job(i).state for i in ids] == [JobState.AVAILABLE] * 3
    assert sorted(j.id for j in store.claim(owner="w", limit=10, lease_ttl=30)) == sorted(ids)


def test_enqueue_many_schedules_each_job_by_its_own_run_at_or_delay(conn: psycopg.Connection) -> None:
    now = db_now(conn)
    ids = pulsed.enqueue_many(conn, [
        {"type": "t"},
        {"type": "t", "delay": 3600},
        {"type": "t", "run_at": now + timedelta(hours=2)},
        {"type": "t", "run_at": now - timedelta(hours=2)},
    ])
    store = Store(conn)
    assert [store.get_job(i).state for i in ids] == [
        JobState.AVAILABLE, JobState.SCHEDULED, JobState.SCHEDULED, JobState.AVAILABLE]
    assert store.get_job(ids[2]).run_at == now + timedelta(hours=2)


# -- claim order and queues -------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2, 100])
def test_claims_go_by_priority_then_run_at_then_id(conn: psycopg.Connection, limit: int) -> None:
    now = db_now(conn)
    same_time = now - timedelta(seconds=5)
    enqueued = {
        "low": pulsed.enqueue(conn, "t", priority=5, run_at=now - timedelta(seconds=60)),
        "urgent_late": pulsed.enqueue(conn, "t", priority=-3, run_at=now - timedelta(seconds=10)),
        "urgent_early": pulsed.enqueue(conn, "t", priority=-3, run_at=now - timedelta(seconds=20)),
        "normal_a": pulsed.enqueue(conn, "t", priority=0, run_at=same_time),
        "normal_b": pulsed.enqueue(conn, "t", priority=0, run_at=same_time),
        "top": pulsed.enqueue(conn, "t", priority=-32768),
        "bottom": pulsed.enqueue(conn, "t", priority=32767, run_at=now - timedelta(days=1)),
    }
    expected = ["top", "urgent_early", "urgent_late", "normal_a", "normal_b", "low", "bottom"]
    names = {job_id: name for name, job_id in enqueued.items()}

    store = Store(conn)
    claimed: list[str] = []
    while batch := store.claim(owner="w", limit=limit, lease_ttl=30):
        assert len(batch) <= limit
        claimed += [names[j.id] for j in batch]
    assert claimed == expected


@pytest.mark.parametrize("limit", [1, 3, 5, 100])
def test_overdue_jobs_come_first_and_the_rest_by_priority(dsn: str, conn: psycopg.Connection,
                                                           limit: int) -> None:
    now = db_now(conn)
    old = [pulsed.enqueue(conn, "t", priority=9, run_at=now - timedelta(seconds=300 - i))
           for i in range(3)]  # waited past `aging`: oldest first, whatever their priority
    fresh = [pulsed.enqueue(conn, "t", priority=p) for p in (1, 0, 2)]
    conn.commit()
    expected = old + [fresh[1], fresh[0], fresh[2]]

    with psycopg.connect(dsn) as other:
        claimed = Store(conn).claim(owner="w", limit=limit, lease_ttl=30, aging=60)
        assert sorted(j.id for j in claimed) == sorted(expected[:limit])
        # While that claim's transaction is open, nothing else is locked by it.
        rest = Store(other).claim(owner="w2", limit=100, lease_ttl=30, aging=60)
        assert sorted(j.id for j in rest) == sorted(expected[limit:])


def test_claim_filters_by_queue(conn: psycopg.Connection) -> None:
    ids = {queue: [pulsed.enqueue(conn, "t", queue=queue) for _ in range(3)]
           for queue in ("a", "b", "default")}
    store = Store(conn)

    only_a = store.claim(owner="w", limit=100, lease_ttl=30, queues=["a"])
    assert sorted(j.id for j in only_a) == ids["a"]
    assert {j.queue for j in only_a} == {"a"}
    assert store.claim(owner="w", limit=100, lease_ttl=30, queues=["a"]) == []
    assert store.claim(owner="w", limit=100, lease_ttl=30, queues=["nope"]) == []

    b_and_default = store.claim(owner="w", limit=100, lease_ttl=30, queues=["b", "default"])
    assert sorted(j.id for j in b_and_default) == sorted(ids["b"] + ids["default"])


@pytest.mark.parametrize("by_type", [False, True])
def test_claim_takes_only_the_handled_types_and_leaves_the_rest_untouched(
        conn: psycopg.Connection, by_type: bool) -> None:
    now = db_now(conn)
    orphans = [pulsed.enqueue(conn, "orphan", priority=-5, run_at=now - timedelta(hours=1))
               for _ in range(3)]  # first by priority and overdue by age
    ids = {t: [pulsed.enqueue(conn, t) for _ in range(2)] for t in ("a", "b", "c")}
    store = Store(conn)

    claimed = store.claim(owner="w", limit=100, lease_ttl=30, aging=60, handled=["a", "c"],
                          by_type=by_type)
    assert sorted(j.id for j in claimed) == sorted(ids["a"] + ids["c"])
    assert store.claim(owner="w", limit=100, lease_ttl=30, handled=["a"], by_type=by_type) == []
    assert store.claim(owner="w", limit=100, lease_ttl=30, handled=[], by_type=by_type) == []
    for job_id in orphans + ids["b"]:
        record = store.get_job(job_id)
        assert record.state is JobState.AVAILABLE and record.attempt == 0


@pytest.mark.parametrize("limit", [1, 2, 5, 100])
def test_claiming_by_type_keeps_the_claim_order(conn: psycopg.Connection, limit: int) -> None:
    """job_claim_by_type hands out jobs in job_claim's order (overdue ones
    oldest first, then by priority, then age) across the handled types."""
    def order(by_type: bool) -> list[int]:
        now = db_now(conn)
        for i, (job_type, priority, age) in enumerate([
                ("a", 9, 300), ("b", 9, 290), ("a", 5, 280), ("b", 1, 5), ("a", 0, 4),
                ("b", 0, 3), ("a", 2, 2), ("orphan", -9, 500), ("orphan", -9, 1)]):
            pulsed.enqueue(conn, job_type, {"i": i}, priority=priority,
                           run_at=now - timedelta(seconds=age))
        store, claimed = Store(conn), []
        while batch := store.claim(owner="w", limit=limit, lease_ttl=30, aging=60,
                                   handled=["a", "b"], by_type=by_type):
            claimed += [j.payload["i"] for j in batch]
        conn.execute("DELETE FROM pulse_jobs")
        return claimed

    by_type = order(True)
    assert by_type == order(False)
    assert sorted(by_type) == [0, 1, 2, 3, 4, 5, 6]
    if limit == 1:
        assert by_type == [0, 1, 2, 4, 5, 3, 6]


def test_worker_with_queues_runs_only_those_queues(dsn: str, conn: psycopg.Connection) -> None:
    in_a = pulsed.enqueue(conn, "t", queue="a")
    in_b = pulsed.enqueue(conn, "t", queue="b")
    registry, calls = counting_registry()

    assert pulsed.run_worker(dsn, registry=registry, queues=("a",)) == 1
    assert calls == [in_a]
    store = Store(conn)
    assert store.get_job(in_a).state is JobState.COMPLETED
    assert store.get_job(in_b).state is JobState.AVAILABLE


def test_claim_sets_a_lease_and_counts_the_attempt(conn: psycopg.Connection) -> None:
    job_id = pulsed.enqueue(conn, "t", {"x": 1}, priority=3, max_attempts=4,
                            idempotency_key="key")
    [job] = Store(conn).claim(owner="worker-1", limit=5, lease_ttl=30)

    assert (job.id, job.type, job.queue, job.payload, job.priority, job.attempt,
            job.max_attempts, job.idempotency_key) == (
        job_id, "t", "default", {"x": 1}, 3, 1, 4, "key")
    assert job.lease_token is not None
    owner, token, expires, state, remaining = conn.execute(
        "SELECT lease_owner, lease_token, lease_expires_at, state::text,"
        " extract(epoch FROM lease_expires_at - now()) FROM pulse_jobs WHERE id = %s",
        (job_id,)).fetchone()
    assert (owner, token, state) == ("worker-1", job.lease_token, "running")
    assert 20 < remaining <= 30


def test_enqueued_job_keeps_what_it_was_given(conn: psycopg.Connection) -> None:
    run_at = datetime(2031, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    job_id = pulsed.enqueue(conn, "email", {"to": "a@example.com", "n": [1, 2.5, None, "é"]},
                            priority=-7, run_at=run_at, max_attempts=3,
                            idempotency_key="mail-1", queue="mail")
    record = Store(conn).get_job(job_id)
    assert (record.type, record.queue, record.priority, record.max_attempts,
            record.idempotency_key, record.attempt, record.state) == (
        "email", "mail", -7, 3, "mail-1", 0, JobState.SCHEDULED)
    assert record.payload == {"to": "a@example.com", "n": [1, 2.5, None, "é"]}
    assert record.run_at == run_at
    assert record.attempts == ()
    defaults = Store(conn).get_job(pulsed.enqueue(conn, "t"))
    assert (defaults.queue, defaults.priority, defaults.max_attempts, defaults.payload,
            defaults.idempotency_key) == ("default", 0, None, {}, None)
    # max_attempts None: the type's default (handler, [types], else 20),
    # resolved by the worker that first claims it.


def test_enqueue_many_maps_every_item_to_its_job_with_keys_mixed_in(
        conn: psycopg.Connection) -> None:
    held = pulsed.enqueue(conn, "t", {"i": "held"}, idempotency_key="old")
    specs = [{"type": "t", "payload": {"i": i},
              "idempotency_key": [None, "a", "old", "b", "a", None, "b"][i % 7]}
             for i in range(70)]
    ids = pulsed.enqueue_many(conn, specs)

    payload_of = {row[0]: row[1] for row in conn.execute("SELECT id, payload->'i' FROM pulse_jobs")}
    first_with = {"old": "held", "a": 1, "b": 3}
    for spec, job_id in zip(specs, ids):
        key = spec["idempotency_key"]
        assert payload_of[job_id] == (spec["payload"]["i"] if key is None else first_with[key])
    assert ids.count(held) == 10
    assert count_jobs(conn) == 1 + 20 + 2


def notifications(dsn: str, enqueue: Callable[[psycopg.Connection], object]) -> list[str]:
    """The pulse_jobs notifications one committed enqueue sends."""
    with psycopg.connect(dsn, autocommit=True) as listener, psycopg.connect(dsn) as producer:
        listener.execute("LISTEN pulse_jobs")
        enqueue(producer)
        producer.commit()
        return sorted(n.payload for n in listener.notifies(timeout=0.5))


def test_an_enqueue_wakes_workers_of_its_queue_once_it_commits(dsn: str) -> None:
    assert notifications(dsn, lambda c: pulsed.enqueue(c, "t", queue="mail")) == ["mail"]
    assert notifications(dsn, lambda c: pulsed.enqueue(c, "t", delay=60)) == []
    assert notifications(dsn, lambda c: pulsed.enqueue_many(c, [
        {"type": "t", "queue": q} for q in ["a", "b", "a", "a"]]
        + [{"type": "t", "queue": "later", "delay": 60}])) == ["a", "b"]
