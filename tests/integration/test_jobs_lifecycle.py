"""A job's life through the Worker against a real PostgreSQL: success,
errors and backoff, Fail, Snooze, timeouts, missing handlers, cancel and
retry (SPEC §3 "Handlers", "Timeout"; §9 attempt outcomes)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any, Callable

import psycopg
import pytest

import pulsed
from pulsed.api import HandlerRegistry
from pulsed.db.store import Store
from pulsed.jobs import Job, JobRecord, JobState
from pulsed.worker import Worker, WorkerOptions

pytestmark = pytest.mark.usefixtures("fast_commits")


def batch_option(n: int) -> dict[str, int]:
    """The WorkerOptions keyword for claiming up to n jobs at once."""
    fields = WorkerOptions.__dataclass_fields__
    return {"prefetch": n} if "prefetch" in fields else {"batch_size": n}




NO_BACKOFF: Callable[[int], float] = lambda attempt: 0.0  # noqa: E731


def db_now(conn: psycopg.Connection) -> datetime:
    return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def registry_of(job_type: str, func: Callable[[Job], Any], **kwargs: Any) -> HandlerRegistry:
    registry = HandlerRegistry()
    registry.register(job_type, func, **kwargs)
    return registry


def outcomes(record: JobRecord) -> list[tuple[int, str]]:
    return [(a.attempt, a.outcome) for a in record.attempts]


def run(dsn: str, registry: HandlerRegistry, **kwargs: Any) -> int:
    kwargs.setdefault("owner", "test-worker")
    return pulsed.run_worker(dsn, registry=registry, **kwargs)


# -- success and errors -----------------------------------------------------------------


def test_success_completes_the_job_with_one_completed_attempt(dsn: str, conn: psycopg.Connection) -> None:
    seen: list[Job] = []
    job_id = pulsed.enqueue(conn, "ok", {"x": 1}, priority=2, max_attempts=7,
                            idempotency_key="k", queue="q")
    created_at = Store(conn).get_job(job_id).created_at

    assert run(dsn, registry_of("ok", seen.append)) == 1

    [job] = seen
    assert (job.id, job.type, job.queue, job.payload, job.priority, job.attempt,
            job.max_attempts, job.idempotency_key, job.created_at) == (
        job_id, "ok", "q", {"x": 1}, 2, 1, 7, "k", created_at)
    record = Store(conn).get_job(job_id)
    assert record.state is JobState.COMPLETED
    assert record.attempt == 1
    assert record.finished_at is not None and record.finished_at >= record.started_at
    assert record.last_error is None
    [attempt] = record.attempts
    assert (attempt.attempt, attempt.outcome, attempt.worker) == (1, "completed", "test-worker")
    assert attempt.started_at is not None and attempt.finished_at is not None


def test_batches_of_jobs_all_complete(dsn: str, conn: psycopg.Connection) -> None:
    ids = pulsed.enqueue_many(conn, [{"type": "ok", "payload": {"i": i}} for i in range(25)])
    seen: list[int] = []
    assert run(dsn, registry_of("ok", lambda job: seen.append(job.id)),
               **batch_option(10)) == 25
    assert sorted(seen) == sorted(ids)
    states = conn.execute("SELECT state::text, count(*) FROM pulse_jobs GROUP BY 1").fetchall()
    assert states == [("completed", 25)]


def boom(job: Job) -> None:
    raise ValueError(f"boom on attempt {job.attempt}")


def test_an_exception_makes_the_job_retryable_after_a_backoff(dsn: str, conn: psycopg.Connection) -> None:
    job_id = pulsed.enqueue(conn, "boom", max_attempts=3)

    assert run(dsn, registry_of("boom", boom)) == 1

    record = Store(conn).get_job(job_id)
    assert record.state is JobState.RETRYABLE
    assert record.attempt == 1
    assert record.finished_at is None
    assert "boom on attempt 1" in record.last_error
    [attempt] = record.attempts
    assert (attempt.attempt, attempt.outcome, attempt.worker) == (1, "error", "test-worker")
    assert attempt.error_class == "ValueError"
    assert "boom on attempt 1" in attempt.error_message
    assert "Traceback" in attempt.traceback and "in boom" in attempt.traceback
    assert "ValueError: boom on attempt 1" in attempt.traceback
    # Exponential backoff with jitter: ~2 s (+-25%) after the first attempt.
    backoff = (record.run_at - attempt.finished_at).total_seconds()
    assert 1.4 <= backoff <= 2.6
    assert record.run_at > db_now(conn) - timedelta(seconds=1)
    # Not due yet: nothing to claim, nothing to promote.
    assert Store(conn).claim(owner="other", limit=5, lease_ttl=30) == []


def test_errors_until_max_attempts_fail_the_job(dsn: str, conn: psycopg.Connection) -> None:
    calls: list[int] = []

    def always_fails(job: Job) -> None:
        calls.append(job.attempt)
        raise RuntimeError(f"attempt {job.attempt}")

    job_id = pulsed.enqueue(conn, "flaky", max_attempts=3)
    store = Store(conn)
    for expected_state in (JobState.RETRYABLE, JobState.RETRYABLE, JobState.FAILED):
        assert run(dsn, registry_of("flaky", always_fails), backoff=NO_BACKOFF) == 1
        assert store.get_job(job_id).state is expected_state
        store.promote_due()

    assert calls == [1, 2, 3]
    assert run(dsn, registry_of("flaky", always_fails), backoff=NO_BACKOFF) == 0
    record = store.get_job(job_id)
    assert record.state is JobState.FAILED
    assert record.attempt == 3
    assert record.finished_at is not None
    assert outcomes(record) == [(1, "error"), (2, "error"), (3, "error")]
    assert [a.error_message for a in record.attempts] == [
        "RuntimeError: attempt 1", "RuntimeError: attempt 2", "RuntimeError: attempt 3"]
    assert "attempt 3" in record.last_error


def test_handler_max_attempts_caps_the_attempts_of_its_type(dsn: str, conn: psycopg.Connection) -> None:
    # SPEC §3: @pulsed.handler("email", max_attempts=5, timeout=30): the
    # handler's max_attempts applies to jobs of its type enqueued without one.
    registry = registry_of("capped", boom, max_attempts=2)
    job_id = pulsed.enqueue(conn, "capped")
    store = Store(conn)

    for _ in range(2):
        assert run(dsn, registry, backoff=NO_BACKOFF) == 1
        store.promote_due()

    record = store.get_job(job_id)
    assert record.attempt == 2
    assert record.state is JobState.FAILED, (
        f"after 2 errors with a handler max_attempts=2 the job is {record.state.value}"
        f" (its row says max_attempts={record.max_attempts})")


def test_fail_fails_the_job_at_once(dsn: str, conn: psycopg.Connection) -> None:
    def refuse(job: Job) -> None:
        raise pulsed.Fail("bad address")

    job_id = pulsed.enqueue(conn, "refuse", max_attempts=10)
    assert run(dsn, registry_of("refuse", refuse)) == 1

    record = Store(conn).get_job(job_id)
    assert record.state is JobState.FAILED
    assert record.attempt == 1
    assert record.finished_at is not None
    [attempt] = record.attempts
    assert attempt.outcome == "error"
    assert attempt.error_class == "Fail"
    assert "bad address" in attempt.error_message
    assert run(dsn, registry_of("refuse", refuse)) == 0


# -- snooze ---------------------------------------------------------------------------------


def snooze_once(seconds: float, seen: list[int]) -> Callable[[Job], None]:
    def handler(job: Job) -> None:
        seen.append(job.attempt)
        if len(seen) == 1:
            raise pulsed.Snooze(seconds)

    return handler


def test_snooze_zero_makes_the_job_available_without_using_an_attempt(
        dsn: str, conn: psycopg.Connection) -> None:
    seen: list[int] = []
    registry = registry_of("nap", snooze_once(0, seen))
    job_id = pulsed.enqueue(conn, "nap", max_attempts=1)
    store = Store(conn)

    assert run(dsn, registry, max_jobs=1) == 1
    record = store.get_job(job_id)
    assert record.state is JobState.AVAILABLE
    assert record.attempt == 0
    assert record.run_at <= db_now(conn)
    assert outcomes(record) == [(1, "snoozed")]

    assert run(dsn, registry) == 1
    record = store.get_job(job_id)
    assert seen == [1, 1]  # the snooze did not use up the only attempt
    assert record.state is JobState.COMPLETED
    assert record.attempt == 1
    assert outcomes(record) == [(1, "snoozed"), (1, "completed")]


def test_snooze_sixty_schedules_the_job_without_using_an_attempt(
        dsn: str, conn: psycopg.Connection) -> None:
    seen: list[int] = []
    registry = registry_of("nap", snooze_once(60, seen))
    job_id = pulsed.enqueue(conn, "nap", max_attempts=1)
    store = Store(conn)

    assert run(dsn, registry) == 1  # stops: the snoozed job is not due
    record = store.get_job(job_id)
    assert record.state is JobState.SCHEDULED
    assert record.attempt == 0
    snoozed_at = record.attempts[0].finished_at
    assert 59 <= (record.run_at - snoozed_at).total_seconds() <= 61
    assert outcomes(record) == [(1, "snoozed")]
    assert store.promote_due() == []

    assert [p["id"] for p in store.promote_due(now=record.run_at + timedelta(seconds=1))] == [job_id]
    assert run(dsn, registry) == 1
    record = store.get_job(job_id)
    assert seen == [1, 1]
    assert record.state is JobState.COMPLETED
    assert record.attempt == 1


def test_repeated_snoozes_never_exhaust_attempts(dsn: str, conn: psycopg.Connection) -> None:
    seen: list[int] = []

    def snooze_thrice(job: Job) -> None:
        seen.append(job.attempt)
        if len(seen) <= 3:
            raise pulsed.Snooze(0)

    job_id = pulsed.enqueue(conn, "nap", max_attempts=1)
    assert run(dsn, registry_of("nap", snooze_thrice)) == 4
    record = Store(conn).get_job(job_id)
    assert seen == [1, 1, 1, 1]
    assert (record.state, record.attempt) == (JobState.COMPLETED, 1)


@pytest.mark.parametrize("concurrency", [1, 4])
@pytest.mark.parametrize("seconds", [1e12, 1e300])
def test_a_snooze_past_100_years_is_an_error_attempt_and_the_worker_runs_on(
        dsn: str, conn: psycopg.Connection, concurrency: int, seconds: float) -> None:
    """Snooze(1e300) once reached the database as a run_at past its range:
    "timestamp out of range" crashed the worker, and its jobs ran again.
    Snooze(1e12) scheduled the job for the year 33,700."""
    ran: list[str] = []

    def nap(job: Job) -> None:
        ran.append(job.payload["name"])
        if job.payload["name"] == "far":
            raise pulsed.Snooze(seconds)

    far = pulsed.enqueue(conn, "nap", {"name": "far"}, max_attempts=1)
    near = pulsed.enqueue(conn, "nap", {"name": "near"})
    assert run(dsn, registry_of("nap", nap), concurrency=concurrency) == 2
    store = Store(conn)
    record = store.get_job(far)
    assert (record.state, outcomes(record)) == (JobState.FAILED, [(1, "error")])
    assert record.attempts[0].error_class == "JobInputError"
    assert "seconds: must be at most 3153600000 seconds (100 years)" in record.last_error
    assert store.get_job(near).state is JobState.COMPLETED
    assert sorted(ran) == ["far", "near"]


# -- timeouts and odd failures -----------------------------------------------------------------


def test_a_handler_past_its_timeout_is_stopped_and_recorded_as_timeout(
        dsn: str, conn: psycopg.Connection) -> None:
    job_id = pulsed.enqueue(conn, "slow", max_attempts=2)
    registry = registry_of("slow", lambda job: time.sleep(5), timeout=0.2)

    started = time.monotonic()
    assert run(dsn, registry) == 1
    assert time.monotonic() - started < 3

    record = Store(conn).get_job(job_id)
    assert record.state is JobState.RETRYABLE
    [attempt] = record.attempts
    assert attempt.outcome == "timeout"
    assert attempt.error_class == "JobTimeout"


def test_a_per_job_timeout_given_at_enqueue_applies(dsn: str, conn: psycopg.Connection) -> None:
    job_id = pulsed.enqueue(conn, "slow", max_attempts=1, timeout=0.2)
    started = time.monotonic()
    assert run(dsn, registry_of("slow", lambda job: time.sleep(5))) == 1
    assert time.monotonic() - started < 3
    record = Store(conn).get_job(job_id)
    assert record.state is JobState.FAILED
    assert outcomes(record) == [(1, "timeout")]


def test_an_exception_whose_str_raises_is_still_recorded(dsn: str, conn: psycopg.Connection) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

        def __repr__(self) -> str:
            raise RuntimeError("no repr either")

    def raise_unprintable(job: Job) -> None:
        raise Unprintable()

    job_id = pulsed.enqueue(conn, "odd", max_attempts=2)
    assert run(dsn, registry_of("odd", raise_unprintable)) == 1

    record = Store(conn).get_job(job_id)
    assert record.state is JobState.RETRYABLE
    [attempt] = record.attempts
    assert attempt.outcome == "error"
    assert attempt.error_class.endswith("Unprintable")
    assert "Unprintable" in attempt.error_message
    assert attempt.traceback


def test_a_job_without_a_handler_waits_untouched_for_a_worker_that_has_one(
        dsn: str, conn: psycopg.Connection) -> None:
    orphan = pulsed.enqueue(conn, "nobody-handles-this", priority=-1, max_attempts=3)
    handled = pulsed.enqueue(conn, "something-else")
    assert run(dsn, registry_of("something-else", lambda job: None)) == 1

    store = Store(conn)
    assert store.get_job(handled).state is JobState.COMPLETED
    record = store.get_job(orphan)
    assert record.state is JobState.AVAILABLE
    assert record.attempt == 0 and not record.attempts


def test_a_worker_claims_type_by_type_while_other_types_wait_and_registers_its_own(
        dsn: str, conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting jobs of a type it has no handler for switch a worker to the
    per-type claim (job_claim_by_type) until they are gone; each look also
    registers the types it handles for the cluster's view."""
    monkeypatch.setattr("pulsed.worker.TYPES_PROBE_S", 0.0)  # look before every claim
    used: list[bool] = []
    claim = Store.complete_and_claim

    def spy(self: Store, *args: Any, **kwargs: Any) -> Any:
        used.append(kwargs["by_type"])
        return claim(self, *args, **kwargs)

    monkeypatch.setattr(Store, "complete_and_claim", spy)
    orphan = pulsed.enqueue(conn, "nobody-handles-this")
    handled = [pulsed.enqueue(conn, "mine") for _ in range(3)]
    worker = Worker(dsn, WorkerOptions(owner="w", node_id="node-x"),
                    registry=registry_of("mine", lambda job: None))
    try:
        assert sorted(j.id for j in worker.claim(10)) == handled and used == [True]
        assert conn.execute("SELECT types FROM pulse_worker_types WHERE node_id = 'node-x'"
                            ).fetchone()[0] == ["mine"]
        Store(conn).cancel(orphan)
        worker.claim(10)
        assert used == [True, False]
    finally:
        worker.close()


def test_a_handler_gone_after_the_claim_records_an_error_and_stays_retryable(
        dsn: str, conn: psycopg.Connection) -> None:
    job_id = pulsed.enqueue(conn, "nobody-handles-this", max_attempts=3)
    registry = registry_of("nobody-handles-this", lambda job: None)
    worker = Worker(dsn, WorkerOptions(owner="w"), registry=registry)
    try:
        [job] = worker.claim(1)
        registry._handlers.clear()  # a handler module that unregisters (or a registry bug)
        worker.run_batch([job])
        worker.flush()
    finally:
        worker.close()

    record = Store(conn).get_job(job_id)
    assert record.state is JobState.RETRYABLE
    assert record.attempt == 1
    [attempt] = record.attempts
    assert attempt.outcome == "error"
    assert attempt.error_class == "HandlerNotFound"
    assert "nobody-handles-this" in attempt.error_message


# -- cancel -------------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["available", "scheduled"])
def test_cancel_a_waiting_job(dsn: str, conn: psycopg.Connection, when: str) -> None:
    store = Store(conn)
    job_id = pulsed.enqueue(conn, "t", delay=3600 if when == "scheduled" else None)
    assert store.get_job(job_id).state.value == when

    assert store.cancel(job_id) is True
    record = store.get_job(job_id)
    assert record.state is JobState.CANCELLED
    assert record.finished_at is not None
    assert record.attempts == ()  # no attempt was running
    assert store.cancel(job_id) is False  # already finished
    store.promote_due(now=db_now(conn) + timedelta(days=1))
    assert store.claim(owner="w", limit=10, lease_ttl=30) == []
    assert run(dsn, registry_of("t", lambda job: None)) == 0


def test_cancel_a_running_job_fences_out_its_worker(conn: psycopg.Connection) -> None:
    store = Store(conn)
    job_id = pulsed.enqueue(conn, "t", max_attempts=5)
    [job] = store.claim(owner="w1", limit=1, lease_ttl=30)

    assert store.cancel(job_id) is True
    cancelled = conn.execute("SELECT * FROM pulse_jobs WHERE id = %s", (job_id,)).fetchone()

    assert store.complete([job]) == set()
    assert store.record_error(job, retry=True, backoff=0, outcome="error", error_class="E",
                              message="m", traceback="t") is None
    assert store.snooze(job, 0) is None
    assert store.renew_leases([job], 30) == set()
    assert conn.execute("SELECT * FROM pulse_jobs WHERE id = %s", (job_id,)).fetchone() == cancelled

    record = store.get_job(job_id)
    assert record.state is JobState.CANCELLED
    assert record.finished_at is not None
    [attempt] = record.attempts
    assert (attempt.attempt, attempt.outcome, attempt.worker) == (1, "cancelled", "w1")


@pytest.mark.parametrize("then", ["returns", "raises", "snoozes"])
def test_a_job_cancelled_while_its_handler_runs_stays_cancelled(
        dsn: str, conn: psycopg.Connection, then: str) -> None:
    def cancel_myself(job: Job) -> None:
        with psycopg.connect(dsn, autocommit=True) as other:
            assert Store(other).cancel(job.id) is True
        if then == "raises":
            raise RuntimeError("after cancel")
        if then == "snoozes":
            raise pulsed.Snooze(0)

    job_id = pulsed.enqueue(conn, "self-cancel", max_attempts=5)
    assert run(dsn, registry_of("self-cancel", cancel_myself)) == 1

    record = Store(conn).get_job(job_id)
    assert record.state is JobState.CANCELLED
    assert outcomes(record) == [(1, "cancelled")]
    assert record.finished_at is not None


# -- retry -------------------------------------------------------------------------------------


def test_retry_a_failed_job_runs_it_again(dsn: str, conn: psycopg.Connection) -> None:
    store = Store(conn)
    job_id = pulsed.enqueue(conn, "once", max_attempts=1)
    calls: list[int] = []

    def fail_first(job: Job) -> None:
        calls.append(job.attempt)
        if job.attempt == 1:
            raise RuntimeError("first time")

    registry = registry_of("once", fail_first)
    assert run(dsn, registry) == 1
    assert store.get_job(job_id).state is JobState.FAILED

    assert store.retry(job_id) is True
    record = store.get_job(job_id)
    assert record.state is JobState.AVAILABLE
    assert record.finished_at is None
    assert record.max_attempts >= 2  # one more attempt was granted

    assert run(dsn, registry) == 1
    record = store.get_job(job_id)
    assert calls == [1, 2]
    assert (record.state, record.attempt) == (JobState.COMPLETED, 2)
    assert outcomes(record) == [(1, "error"), (2, "completed")]


def test_retry_a_cancelled_job_runs_it(dsn: str, conn: psycopg.Connection) -> None:
    store = Store(conn)
    job_id = pulsed.enqueue(conn, "t")
    assert store.cancel(job_id)
    assert store.retry(job_id) is True
    assert store.get_job(job_id).state is JobState.AVAILABLE
    assert run(dsn, registry_of("t", lambda job: None)) == 1
    assert store.get_job(job_id).state is JobState.COMPLETED


def test_retry_a_completed_job_runs_it_again(dsn: str, conn: psycopg.Connection) -> None:
    store = Store(conn)
    job_id = pulsed.enqueue(conn, "t", max_attempts=1)
    calls: list[int] = []
    registry = registry_of("t", lambda job: calls.append(job.attempt))
    assert run(dsn, registry) == 1

    assert store.retry(job_id) is True
    assert store.get_job(job_id).state is JobState.AVAILABLE
    assert run(dsn, registry) == 1
    assert calls == [1, 2]
    record = store.get_job(job_id)
    assert (record.state, record.attempt) == (JobState.COMPLETED, 2)


def test_retry_of_a_completed_job_keeps_its_attempt_history(dsn: str, conn: psycopg.Connection) -> None:
    # SPEC §3: a job has "its attempt history (one row per attempt)".
    store = Store(conn)
    job_id = pulsed.enqueue(conn, "t")
    registry = registry_of("t", lambda job: None)
    assert run(dsn, registry) == 1
    assert outcomes(store.get_job(job_id)) == [(1, "completed")]

    assert store.retry(job_id) is True
    assert outcomes(store.get_job(job_id)) == [(1, "completed")], \
        "the completed first attempt vanished from the history when the job was retried"
    assert run(dsn, registry) == 1
    assert outcomes(store.get_job(job_id)) == [(1, "completed"), (2, "completed")]


def test_retry_of_a_running_job_is_refused(conn: psycopg.Connection) -> None:
    store = Store(conn)
    job_id = pulsed.enqueue(conn, "t")
    [job] = store.claim(owner="w1", limit=1, lease_ttl=30)
    before = conn.execute("SELECT * FROM pulse_jobs WHERE id = %s", (job_id,)).fetchone()

    assert store.retry(job_id) is False
    assert conn.execute("SELECT * FROM pulse_jobs WHERE id = %s", (job_id,)).fetchone() == before
    assert store.complete([job]) == {job_id}  # the lease still holds


def test_retry_and_cancel_of_a_missing_job_do_nothing(conn: psycopg.Connection) -> None:
    store = Store(conn)
    assert store.retry(424242) is False
    assert store.cancel(424242) is False
    assert store.get_job(424242) is None
