"""The lease fence: a worker whose lease was taken away cannot change its job
any more (SPEC §3 "Claim"; DESIGN "Jobs, leases and correctness"), and a
lease that is renewed is not taken away."""

from __future__ import annotations

from contextlib import nullcontext

import threading
from datetime import datetime, timedelta
from typing import Any, Callable

import psycopg
import pytest

import pulsed
from pulsed.api import HandlerRegistry
from pulsed.db.store import ClaimTerms, Store, TypeLimit
from pulsed.jobs import Job, JobState
from pulsed.lease import LeaseKeeper
from pulsed.ledger import JobLedger
from pulsed.worker import Worker, WorkerOptions
from tests.pg import wait_until

pytestmark = pytest.mark.usefixtures("fast_commits")

FAR_FUTURE = timedelta(days=365)




def reaped_ids(rows: list[Any]) -> list[int]:
    """The ids reap_expired took back (it returns ids or rows, by version)."""
    return [r if isinstance(r, int) else r["id"] for r in rows]


def db_now(conn: psycopg.Connection) -> datetime:
    return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def make_due(conn: psycopg.Connection) -> list[int]:
    """Promote the jobs a take-back left retryable (their crash backoff is
    ~2 s), as the leader's promoter would once it passed; the ids promoted."""
    return [r["id"] for r in Store(conn).promote_due(now=db_now(conn) + timedelta(hours=2))]


def snapshot(conn: psycopg.Connection, job_id: int) -> tuple[Any, ...]:
    """Everything stored about a job: its row and its attempt history."""
    row = conn.execute("SELECT * FROM pulse_jobs WHERE id = %s", (job_id,)).fetchone()
    history = conn.execute("SELECT * FROM pulse_job_attempts WHERE job_id = %s ORDER BY id",
                           (job_id,)).fetchall()
    return row, tuple(history)


def stale_writes(store: Store, job: Job) -> dict[str, Any]:
    """Every write a lease holder can make, with what each returned."""
    return {
        "renew": store.renew_leases([job], 30),
        "snooze": store.snooze(job, 0),
        "record_error retry": store.record_error(
            job, retry=True, backoff=0, outcome="error", error_class="E", message="stale",
            traceback="tb"),
        "record_error fail": store.record_error(
            job, retry=False, backoff=0, outcome="error", error_class="E", message="stale",
            traceback="tb"),
        "complete": store.complete([job]),
    }


NOTHING = {"renew": set(), "snooze": None, "record_error retry": None,
           "record_error fail": None, "complete": set()}


def take_back_by_reaping(conn: psycopg.Connection, job: Job) -> None:
    assert reaped_ids(Store(conn).reap_expired(now=db_now(conn) + FAR_FUTURE)) == [job.id]


def take_back_by_releasing_the_owner(conn: psycopg.Connection, job: Job) -> None:
    released = Store(conn).release_owners(["w1"], outcome="worker_died",
                                          message="worker w1 died")
    assert [r["id"] for r in released] == [job.id]


@pytest.mark.parametrize("take_back", [take_back_by_reaping, take_back_by_releasing_the_owner],
                         ids=["reaped", "owner released"])
def test_a_holder_whose_lease_was_taken_back_changes_nothing(
        dsn: str, conn: psycopg.Connection, take_back: Callable[..., None]) -> None:
    job_id = pulsed.enqueue(conn, "t", max_attempts=5)
    with psycopg.connect(dsn, autocommit=True) as worker_conn:
        worker = Store(worker_conn)
        [job] = worker.claim(owner="w1", limit=1, lease_ttl=30)

        take_back(conn, job)
        after = snapshot(conn, job_id)
        # Taken back with attempts left: retryable after the crash backoff.
        assert Store(conn).get_job(job_id).state is JobState.RETRYABLE

        assert stale_writes(worker, job) == NOTHING
        assert snapshot(conn, job_id) == after


@pytest.mark.parametrize("take_back", [take_back_by_reaping, take_back_by_releasing_the_owner],
                         ids=["reaped", "owner released"])
def test_a_stale_holder_cannot_touch_the_job_another_worker_reclaimed(
        dsn: str, conn: psycopg.Connection, take_back: Callable[..., None]) -> None:
    job_id = pulsed.enqueue(conn, "t", max_attempts=5)
    with psycopg.connect(dsn, autocommit=True) as c1, psycopg.connect(dsn, autocommit=True) as c2:
        w1, w2 = Store(c1), Store(c2)
        [stale] = w1.claim(owner="w1", limit=1, lease_ttl=30)
        take_back(conn, stale)
        assert Store(conn).get_job(job_id).state is JobState.RETRYABLE
        assert w2.claim(owner="w2", limit=1, lease_ttl=30) == []  # not before its backoff
        assert make_due(conn) == [job_id]
        [fresh] = w2.claim(owner="w2", limit=1, lease_ttl=30)
        assert fresh.id == job_id
        assert fresh.attempt == 2
        assert fresh.lease_token != stale.lease_token
        held = snapshot(conn, job_id)

        assert stale_writes(w1, stale) == NOTHING
        assert snapshot(conn, job_id) == held

        # The new holder's lease is intact and its writes land.
        assert w2.renew_leases([fresh], 30) == {job_id}
        assert w2.complete([fresh]) == {job_id}
    record = Store(conn).get_job(job_id)
    assert record.state is JobState.COMPLETED
    assert record.attempt == 2
    assert record.lease_owner == "w2"


def test_a_holder_fenced_out_after_its_job_finished_changes_nothing(
        dsn: str, conn: psycopg.Connection) -> None:
    # Completing twice (a duplicated completion write) must not re-finish it.
    job_id = pulsed.enqueue(conn, "t")
    store = Store(conn)
    [job] = store.claim(owner="w1", limit=1, lease_ttl=30)
    assert store.complete([job]) == {job_id}
    done = snapshot(conn, job_id)
    assert stale_writes(store, job) == NOTHING
    assert snapshot(conn, job_id) == done


def test_reap_takes_back_only_expired_leases(conn: psycopg.Connection) -> None:
    store = Store(conn)
    short, long_ = (pulsed.enqueue(conn, "t", {"n": n}) for n in range(2))
    [job_short] = store.claim(owner="w1", limit=1, lease_ttl=1)
    [job_long] = store.claim(owner="w2", limit=1, lease_ttl=3600)
    expires = dict(conn.execute(
        "SELECT id, lease_expires_at FROM pulse_jobs WHERE state = 'running'").fetchall())

    assert reaped_ids(store.reap_expired(now=expires[short] - timedelta(milliseconds=1))) == []
    assert reaped_ids(store.reap_expired(now=expires[short] + timedelta(milliseconds=1))) == [short]
    record = store.get_job(short)
    assert record.state is JobState.RETRYABLE
    assert [(a.attempt, a.outcome, a.worker) for a in record.attempts] == [(1, "lease_expired", "w1")]
    assert store.get_job(long_).state is JobState.RUNNING
    assert store.complete([job_long]) == {long_}
    assert store.complete([job_short]) == set()


def test_reaping_a_job_on_its_last_attempt_fails_it(conn: psycopg.Connection) -> None:
    store = Store(conn)
    job_id = pulsed.enqueue(conn, "t", max_attempts=1)
    store.claim(owner="w1", limit=1, lease_ttl=30)
    assert reaped_ids(store.reap_expired(now=db_now(conn) + FAR_FUTURE)) == [job_id]
    record = store.get_job(job_id)
    assert record.state is JobState.FAILED
    assert record.finished_at is not None


def test_release_owners_leaves_other_owners_alone(conn: psycopg.Connection) -> None:
    store = Store(conn)
    ids = [pulsed.enqueue(conn, "t") for _ in range(3)]
    by_owner = {owner: store.claim(owner=owner, limit=1, lease_ttl=30)[0]
                for owner in ("w1", "w2", "w3")}

    released = store.release_owners(["w1", "w3"], outcome="worker_died",
                                    message="killed by signal 9", error_class="WorkerDied")
    assert sorted(r["id"] for r in released) == sorted([by_owner["w1"].id, by_owner["w3"].id])
    assert store.get_job(by_owner["w2"].id).state is JobState.RUNNING
    assert store.get_job(by_owner["w3"].id).state is JobState.RETRYABLE
    record = store.get_job(by_owner["w1"].id)
    assert record.state is JobState.RETRYABLE
    [attempt] = record.attempts
    assert (attempt.outcome, attempt.worker, attempt.error_class, attempt.error_message) == (
        "worker_died", "w1", "WorkerDied", "killed by signal 9")
    assert sorted(ids) == sorted(j.id for j in by_owner.values())


def test_a_lease_renewed_by_the_lease_keeper_is_not_reaped(dsn: str, conn: psycopg.Connection) -> None:
    store = Store(conn)
    renewed_id = pulsed.enqueue(conn, "t", {"n": 1})
    control_id = pulsed.enqueue(conn, "t", {"n": 2})
    ttl = 0.3
    [renewed] = store.claim(owner="w1", limit=1, lease_ttl=ttl)
    [control] = store.claim(owner="w1", limit=1, lease_ttl=ttl)
    expiry = dict(conn.execute(
        "SELECT id, lease_expires_at FROM pulse_jobs WHERE state = 'running'").fetchall())

    ledger = JobLedger()
    keeper = LeaseKeeper(ledger, lambda: nullcontext(store), ttl)
    try:
        ledger.claimed([renewed])

        def renewed_once() -> bool:
            keeper.renew_due()  # renews only leases held for a third of the TTL
            return conn.execute("SELECT lease_expires_at FROM pulse_jobs WHERE id = %s",
                                (renewed_id,)).fetchone()[0] > expiry[renewed_id]

        wait_until(renewed_once, message="the lease keeper to renew the held lease")
    finally:
        keeper.stop()

    # Past both original expiries: only the lease that was not renewed is reaped.
    reap_at = max(expiry.values()) + timedelta(milliseconds=1)
    assert reaped_ids(store.reap_expired(now=reap_at)) == [control_id]
    assert store.get_job(renewed_id).state is JobState.RUNNING
    assert store.complete([renewed]) == {renewed_id}
    assert store.complete([control]) == set()


def test_a_long_running_handler_keeps_its_lease_through_the_worker(
        dsn: str, conn: psycopg.Connection) -> None:
    """End to end: the Worker's LeaseKeeper thread renews a lease shorter
    than the handler's run, so the reaper (at the real clock) takes nothing."""
    job_id = pulsed.enqueue(conn, "long")
    started, release = threading.Event(), threading.Event()

    def long_handler(job: Job) -> None:
        started.set()
        assert release.wait(20), "the test never released the handler"

    registry = HandlerRegistry()
    registry.register("long", long_handler)
    # Renewals come every third of the TTL or so; 1.5 s leaves room for a
    # loaded machine's scheduling delays without making the test slow.
    ttl = 1.5
    worker = Worker(dsn, WorkerOptions(owner="w-long", lease_ttl=ttl), registry=registry)
    runner = threading.Thread(target=worker.run, kwargs={"stop_when_idle": True})
    runner.start()
    try:
        assert started.wait(10)
        first_expiry = conn.execute("SELECT lease_expires_at FROM pulse_jobs WHERE id = %s",
                                    (job_id,)).fetchone()[0]
        reaped: list[int] = []

        def first_lease_long_outlived() -> bool:
            # The leader's reaper, at the real clock.
            reaped.extend(reaped_ids(Store(conn).reap_expired()))
            return db_now(conn) > first_expiry + timedelta(seconds=ttl)

        wait_until(first_lease_long_outlived, timeout=15,
                   message="the handler to outlive its first lease by a whole TTL")
        assert reaped == []
        assert Store(conn).get_job(job_id).state is JobState.RUNNING
    finally:
        release.set()
        runner.join(20)
    assert not runner.is_alive()
    record = Store(conn).get_job(job_id)
    assert record.state is JobState.COMPLETED
    assert [(a.attempt, a.outcome) for a in record.attempts] == [(1, "completed")]


def test_a_worker_that_lost_its_lease_mid_run_does_not_complete_the_job(
        dsn: str, conn: psycopg.Connection) -> None:
    """The reaper takes the lease while the handler runs; the handler's
    return is then dropped and the job runs again elsewhere."""
    job_id = pulsed.enqueue(conn, "t", max_attempts=5)
    calls: list[int] = []

    def reaped_while_running(job: Job) -> None:
        calls.append(job.attempt)
        if job.attempt == 1:
            with psycopg.connect(dsn, autocommit=True) as leader:
                now = leader.execute("SELECT now()").fetchone()[0]
                assert reaped_ids(Store(leader).reap_expired(now=now + FAR_FUTURE)) == [job.id]

    registry = HandlerRegistry()
    registry.register("t", reaped_while_running)
    assert pulsed.run_worker(dsn, registry=registry, owner="w1", max_jobs=1) == 1
    record = Store(conn).get_job(job_id)
    assert record.state is JobState.RETRYABLE
    assert [(a.attempt, a.outcome) for a in record.attempts] == [(1, "lease_expired")]

    assert make_due(conn) == [job_id]
    assert pulsed.run_worker(dsn, registry=registry, owner="w2") == 1
    record = Store(conn).get_job(job_id)
    assert calls == [1, 2]
    assert (record.state, record.attempt, record.lease_owner) == (JobState.COMPLETED, 2, "w2")


def test_a_job_whose_completion_is_not_yet_written_keeps_its_lease(
        dsn: str, conn: psycopg.Connection) -> None:
    """A worker that runs a batch must not let the lease of a job it already
    finished lapse while a later job of the batch runs long: the finished
    job would be reaped and run a second time (its result dropped)."""
    warm_up = pulsed.enqueue(conn, "quick", priority=-1)  # times the jobs: batches grow
    quick = pulsed.enqueue(conn, "quick", priority=0)
    pulsed.enqueue(conn, "slow", priority=1)
    ttl = 1.0
    ran: list[int] = []
    reaped: list[int] = []

    def slow(job: Job) -> None:
        # Run until the quick job's lease, as claimed, is long past; the
        # leader's reaper runs meanwhile at the real clock.
        with psycopg.connect(dsn, autocommit=True) as leader:
            expiry = leader.execute("SELECT lease_expires_at FROM pulse_jobs WHERE id = %s",
                                    (quick,)).fetchone()[0]
            if expiry is None:  # its completion was written already
                return

            def past_it() -> bool:
                reaped.extend(reaped_ids(Store(leader).reap_expired()))
                return db_now(leader) > expiry + timedelta(seconds=ttl)

            wait_until(past_it, timeout=15, message="the quick job's first lease to lapse")

    registry = HandlerRegistry()
    registry.register("quick", lambda job: ran.append(job.id))
    registry.register("slow", slow)
    options = {"prefetch": 10} if "prefetch" in WorkerOptions.__dataclass_fields__ else {}
    assert pulsed.run_worker(dsn, registry=registry, owner="w1", lease_ttl=ttl, **options) >= 3

    assert reaped == [], f"the reaper took back job(s) {reaped} the worker had finished"
    assert ran.count(quick) == 1, f"the quick job ran {ran.count(quick)} times"
    record = Store(conn).get_job(quick)
    assert (record.state, record.attempt) == (JobState.COMPLETED, 1)
    assert ran[0] == warm_up


def take_back_by_reaping_one(conn: psycopg.Connection, job: Job) -> None:
    """Let this job's lease (alone of its claim's) expire, and reap it."""
    conn.execute("UPDATE pulse_jobs SET lease_expires_at = now() - interval '1 hour' "
                 "WHERE id = %s", (job.id,))
    assert reaped_ids(Store(conn).reap_expired()) == [job.id]


@pytest.mark.parametrize("claim_kind", ["claim", "complete_and_claim", "by_type", "limited"])
def test_one_claims_jobs_share_a_token_and_a_stale_one_among_them_is_still_fenced(
        dsn: str, conn: psycopg.Connection, claim_kind: str) -> None:
    """A claim leases its jobs under one token (one gen_random_uuid() a
    claim, not a row). The fence is the (id, token) pair: when one job of
    the batch is taken back and claimed again, the first holder's
    completion of the whole batch completes the others and not that one,
    and the new holder's write lands."""
    opener = pulsed.enqueue(conn, "t", {"opener": True}, max_attempts=5)
    ids = [pulsed.enqueue(conn, "t", {"i": i}, max_attempts=5) for i in range(3)]
    with psycopg.connect(dsn, autocommit=True) as c1, psycopg.connect(dsn, autocommit=True) as c2:
        w1, w2 = Store(c1), Store(c2)
        [first] = w1.claim(owner="w1", limit=1, lease_ttl=30)
        assert first.id == opener
        if claim_kind == "complete_and_claim":  # one statement: the claim session's settings
            c1.execute("SET enable_seqscan = off")
            c1.execute("SET enable_sort = off")
            held, batch = w1.complete_and_claim(
                [first], ClaimTerms.of(owner="w1", lease_ttl=30), limit=3, claim_session=True)
            assert held == {opener}
        elif claim_kind == "limited":  # pulse_claim_limited (a rate: 10 tokens at first)
            assert w1.complete([first]) == {opener}
            batch = w1.claim(owner="w1", limit=3, lease_ttl=30,
                             limits=[TypeLimit("t", rate_count=100, rate_per_s=1.0)])
        else:
            assert w1.complete([first]) == {opener}
            batch = w1.claim(owner="w1", limit=3, lease_ttl=30, handled=["t"],
                             by_type=claim_kind == "by_type")
        assert sorted(j.id for j in batch) == ids
        assert len({j.lease_token for j in batch}) == 1
        assert batch[0].lease_token != first.lease_token
        stale = next(j for j in batch if j.id == ids[1])
        take_back_by_reaping_one(conn, stale)
        assert make_due(conn) == [stale.id]
        [fresh] = w2.claim(owner="w2", limit=1, lease_ttl=30)
        assert fresh.id == stale.id and fresh.lease_token != stale.lease_token

        assert w1.complete(batch) == {ids[0], ids[2]}
        assert Store(conn).get_job(stale.id).state is JobState.RUNNING
        assert w2.complete([fresh]) == {stale.id}
    assert [Store(conn).get_job(i).lease_owner for i in ids] == ["w1", "w2", "w1"]
    assert all(Store(conn).get_job(i).state is JobState.COMPLETED for i in [opener, *ids])


def test_a_limited_claim_leaves_paused_queues_waiting(conn: psycopg.Connection) -> None:
    """pulse_claim_limited (migration 0016) reads the paused queues as the
    other claims do: a paused queue's jobs of a limited type wait, the
    others are claimed, and after a resume they are claimed too."""
    limits = [TypeLimit("t", rate_count=100, rate_per_s=1.0)]
    held = pulsed.enqueue(conn, "t", queue="held")
    free = pulsed.enqueue(conn, "t", queue="free")
    Store(conn).pause_queue("held")
    Store(conn).pause_queue("also-held")  # more than one: the array of paused queues
    conn.commit()
    store = Store(conn)
    assert [j.id for j in store.claim(owner="w", limit=5, lease_ttl=30, limits=limits)] == [free]
    conn.commit()
    store.resume_queue("held")
    conn.commit()
    assert [j.id for j in store.claim(owner="w", limit=5, lease_ttl=30, limits=limits)] == [held]
