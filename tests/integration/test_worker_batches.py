"""The worker's fast path: batches, completions with the next claim,
prefetched jobs given back when a job runs long or the worker stops."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time

import psycopg
import psycopg.rows
import pytest

import pulsed
from pulsed.db.rows import claimed_jobs as _claimed_jobs
from pulsed.db.store import ClaimTerms, Store
from pulsed.worker import Worker, WorkerOptions
from tests.pg import wait_until


W1 = ClaimTerms.of(owner="w1", lease_ttl=60)
W1_AGING = ClaimTerms.of(owner="w1", lease_ttl=60, aging=60)


def _states(conn: psycopg.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT state::text, count(*) FROM pulse_jobs GROUP BY 1").fetchall())


def _registry(**handlers) -> pulsed.HandlerRegistry:
    registry = pulsed.HandlerRegistry()
    for job_type, func in handlers.items():
        registry.register(job_type, func)
    return registry


def _count_claims(worker: Worker) -> list[int]:
    """The size of every batch worker claims from now on, in order."""
    claims: list[int] = []
    original = worker.claim

    def counting_claim(limit: int, **kwargs):
        jobs = original(limit, **kwargs)
        claims.append(len(jobs))
        return jobs

    worker.claim = counting_claim  # type: ignore[method-assign]
    return claims


def test_batches_grow_for_short_jobs_and_every_job_completes_once(dsn, conn):
    runs: list[int] = []
    pulsed.enqueue_many(conn, [{"type": "quick"}] * 1000)
    worker = Worker(dsn, WorkerOptions(owner="w1", prefetch=100),
                    registry=_registry(quick=lambda job: runs.append(job.id)))
    claims = _count_claims(worker)
    assert worker.run(stop_when_idle=True) == 1000
    assert sorted(runs) == sorted(set(runs)) and len(runs) == 1000
    assert _states(conn) == {"completed": 1000}
    assert claims[0] == 1 and max(claims) == 100, claims[:5]
    assert len(claims) < 40  # about ten claims of 100, not a thousand of one


def test_completions_ride_with_the_next_claim(dsn, conn):
    pulsed.enqueue_many(conn, [{"type": "quick"}] * 3)
    worker = Worker(dsn, WorkerOptions(owner="w1", prefetch=10),
                    registry=_registry(quick=lambda job: None))
    jobs = worker.claim(10)
    worker.run_batch(jobs)
    assert _states(conn) == {"running": 3}  # done, but not yet written
    assert worker.claim(10) == []  # this round trip writes them
    assert _states(conn) == {"completed": 3}
    worker.close()


def test_a_stop_mid_batch_gives_back_the_unstarted_jobs(dsn, conn):
    pulsed.enqueue_many(conn, [{"type": "quick"}] * 5)
    stop = threading.Event()

    def first_stops(job: pulsed.Job) -> None:
        stop.set()

    worker = Worker(dsn, WorkerOptions(owner="w1", prefetch=10),
                    registry=_registry(quick=first_stops))
    worker._avg_duration = 0.0001  # as if short jobs had been timed: claim 5 at once
    assert worker.run(should_stop=stop.is_set) == 1
    states = _states(conn)
    assert states == {"completed": 1, "available": 4}
    attempts = conn.execute("SELECT attempt FROM pulse_jobs WHERE state = 'available'").fetchall()
    assert {a for (a,) in attempts} == {0}, "a give-back must not use up an attempt"


def _given_back_while_the_batch_runs(dsn, conn, worker: Worker, *, batch: int,
                                     give_back_after: float, release=lambda: None) -> list:
    """Run `worker` on a thread (its average job tiny, so it claims `batch`
    jobs at once) and return what a second worker claims while the first
    still holds the batch; release() lets the first worker's jobs end."""
    worker._keeper.give_back_after = give_back_after
    worker._avg_duration = 0.0001
    thread = threading.Thread(target=worker.run, kwargs={"stop_when_idle": True})
    thread.start()
    try:
        wait_until(lambda: _states(conn).get("running") == batch, timeout=10,
                   message="the worker never claimed the batch")
        other = Store(conn)
        claimed = wait_until(lambda: other.claim(owner="w2", limit=10, lease_ttl=30),
                             timeout=10, message="the prefetched jobs were not given back")
        other.complete(claimed)
        conn.commit()
        return claimed
    finally:
        release()
        thread.join(timeout=20)


def test_prefetched_jobs_held_up_behind_a_long_job_are_given_back(dsn, conn):
    release = threading.Event()
    pulsed.enqueue(conn, "slow", priority=0)
    pulsed.enqueue_many(conn, [{"type": "quick", "priority": 1}] * 4)
    worker = Worker(dsn, WorkerOptions(owner="w1", prefetch=10),
                    registry=_registry(slow=lambda job: release.wait(10), quick=lambda job: None))
    # Another worker gets the four quick jobs while the slow one runs.
    claimed = _given_back_while_the_batch_runs(dsn, conn, worker, batch=5, give_back_after=0.3,
                                               release=release.set)
    assert sorted(j.type for j in claimed) == ["quick"] * 4
    assert all(j.attempt == 1 for j in claimed)
    assert conn.execute("SELECT state::text FROM pulse_jobs WHERE type = 'slow'"
                        ).fetchone()[0] == "completed"


def test_a_batch_of_jobs_slower_than_it_was_sized_for_gives_back_its_rest(dsn, conn):
    """No single job runs long, but together they take far longer than the
    batch was sized for (the worker knew only quick jobs): what has waited
    past give_back_after goes back and another worker runs it meanwhile."""
    pulsed.enqueue_many(conn, [{"type": "medium"}] * 8)
    conn.commit()
    worker = Worker(dsn, WorkerOptions(owner="w1", prefetch=8),
                    registry=_registry(medium=lambda job: time.sleep(0.25)))
    claimed = _given_back_while_the_batch_runs(dsn, conn, worker, batch=8, give_back_after=0.6)
    assert 1 <= len(claimed) <= 6 and all(j.attempt == 1 for j in claimed)
    assert _states(conn) == {"completed": 8}


def test_concurrency_runs_io_bound_handlers_on_threads(dsn, conn):
    lock = threading.Lock()
    active = [0, 0]  # now, peak

    def io_bound(job: pulsed.Job) -> None:
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        time.sleep(0.1)
        with lock:
            active[0] -= 1

    pulsed.enqueue_many(conn, [{"type": "io"}] * 20)
    worker = Worker(dsn, WorkerOptions(owner="w1", concurrency=5),
                    registry=_registry(io=io_bound))
    assert worker.run(stop_when_idle=True) == 20
    assert _states(conn) == {"completed": 20}
    assert active[1] == 5  # five handlers at once, not one after another


def test_outcomes_of_jobs_before_a_long_one_are_written_while_it_runs(dsn, conn, caplog):
    release = threading.Event()
    pulsed.enqueue_many(conn, [{"type": "quick", "priority": 0}] * 2
                        + [{"type": "fails", "priority": 1}, {"type": "slow", "priority": 2}])

    def fails(job: pulsed.Job) -> None:
        raise pulsed.Fail("no")

    worker = Worker(dsn, WorkerOptions(owner="w1", prefetch=10), registry=_registry(
        quick=lambda job: None, fails=fails, slow=lambda job: release.wait(10)))
    worker._avg_duration = 0.0001  # claim all four at once
    caplog.set_level("INFO", logger="pulsed.worker")
    thread = threading.Thread(target=worker.run, kwargs={"stop_when_idle": True})
    thread.start()
    try:
        wait_until(lambda: _states(conn) == {"completed": 2, "failed": 1, "running": 1},
                   timeout=5, message="completions waited for the long job")
        lines = [r.getMessage() for r in caplog.records if r.name == "pulsed.worker"]
        assert sum("completed in" in line for line in lines) == 2, lines
        assert sum(" error in " in line for line in lines) == 1, lines
        assert not release.is_set()
    finally:
        release.set()
        thread.join(timeout=10)
    assert _states(conn) == {"completed": 3, "failed": 1}


def test_a_killed_worker_connection_behind_a_long_job_loses_no_completion(dsn, conn):
    """The keeper writes outcomes behind a long job on the worker's one
    connection; cutting it (pg_terminate_backend) loses nothing: the next
    write fails, the keeper reconnects, and the completion is written."""
    first, second = threading.Event(), threading.Event()
    pulsed.enqueue_many(conn, [{"type": "quick", "priority": 0}] * 3
                        + [{"type": "slow1", "priority": 1}, {"type": "quick", "priority": 2},
                           {"type": "slow2", "priority": 3}])
    worker = Worker(dsn, WorkerOptions(owner="w1", prefetch=10), registry=_registry(
        quick=lambda job: None, slow1=lambda job: first.wait(10),
        slow2=lambda job: second.wait(10)))
    worker._avg_duration = 0.0001  # claim all six at once
    thread = threading.Thread(target=worker.run, kwargs={"stop_when_idle": True})
    thread.start()
    try:
        wait_until(lambda: _states(conn) == {"completed": 3, "running": 3}, timeout=5,
                   message="the keeper never wrote the completions")
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'pulse worker w1' AND datname = current_database()"
        ).fetchone()[0]
        assert killed == 1
        first.set()  # slow1 and the next quick job end; slow2 runs: the keeper must write them
        wait_until(lambda: _states(conn) == {"completed": 5, "running": 1}, timeout=10,
                   message="the keeper did not recover its connection")
        assert thread.is_alive() and not second.is_set()
    finally:
        first.set()
        second.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert _states(conn) == {"completed": 6}


def _round_trips(conn: psycopg.Connection, action) -> tuple[int, object]:
    """How many times the client waited for the server (ReadyForQuery
    messages, from libpq's protocol trace) while action() ran."""
    trace, result = _traced(conn, action)
    return trace.count("\tReadyForQuery\t"), result


def _traced(conn: psycopg.Connection, action) -> tuple[str, object]:
    """libpq's protocol trace of what action() sent and received."""
    with tempfile.TemporaryFile() as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            result = action()
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        return trace.read().decode(), result


def _statements_sent(trace: str) -> int:
    return sum(1 for line in trace.splitlines() if line.startswith("F\t") and "\tExecute\t" in line)


@pytest.fixture
def two_of_four_claimed(dsn, conn):
    """A worker's autocommit connection, its Store, and the 2 jobs it
    claimed of 4 enqueued."""
    pulsed.enqueue_many(conn, [{"type": "quick"}] * 4)
    conn.commit()
    with psycopg.connect(dsn, autocommit=True) as worker_conn:
        store = Store(worker_conn)
        yield worker_conn, store, store.claim(owner="w1", limit=2, lease_ttl=60)


@pytest.mark.parametrize("claim_session", [False, True])
def test_completing_and_claiming_is_one_round_trip(conn, two_of_four_claimed, claim_session):
    worker_conn, store, first = two_of_four_claimed
    trace, (held, second) = _traced(worker_conn, lambda: store.complete_and_claim(
        first, W1_AGING, limit=2, claim_session=claim_session))
    assert trace.count("\tReadyForQuery\t") == 1  # psycopg's transaction() in a pipeline took four
    # On a session with the claim's plan settings: one statement
    # (job_complete_and_claim). Without them, pipelined: BEGIN, the plan
    # settings, completion, claim, COMMIT.
    assert _statements_sent(trace) == (1 if claim_session else 5), trace
    assert held == {j.id for j in first} and len(second) == 2
    assert _states(conn) == {"completed": 2, "running": 2}


@pytest.mark.parametrize("claim_session", [False, True])
def test_a_completion_whose_lease_was_lost_is_not_held(conn, two_of_four_claimed,
                                                       claim_session):
    """Both shapes (one statement on a claim session, pipelined without)
    report which completions the lease fence let through."""
    worker_conn, store, first = two_of_four_claimed
    kept, taken = first
    conn.execute("UPDATE pulse_jobs SET lease_token = gen_random_uuid() WHERE id = %s",
                 (taken.id,))  # reaped and claimed by another worker meanwhile
    conn.commit()
    held, second = store.complete_and_claim(first, W1_AGING, limit=2,
                                            claim_session=claim_session)
    assert held == {kept.id} and len(second) == 2
    assert _states(conn) == {"completed": 1, "running": 3}


def test_an_idle_workers_claim_is_one_statement_on_a_session_set_for_claims(dsn, conn):
    """The worker's connection carries the claim's plan settings, so a
    claim with nothing to complete (the one after a wake-up) is a single
    statement: one message to the server, one transaction, one commit."""
    worker = Worker(dsn, WorkerOptions(owner="w1"), registry=_registry(quick=lambda job: None))
    try:
        assert worker.claim(5) == []  # the first claim also looks up the types waiting
        pulsed.enqueue(conn, "quick")
        conn.commit()
        settings = {name: worker.connection().execute(f"SHOW {name}").fetchone()[0]
                    for name in ("enable_seqscan", "enable_sort", "jit")}
        assert settings == {"enable_seqscan": "off", "enable_sort": "off", "jit": "off"}
        trace, jobs = _traced(worker.connection(), lambda: worker.claim(5))
        assert len(jobs) == 1 and _statements_sent(trace) == 1, trace
        assert trace.count("\tReadyForQuery\t") == 1
    finally:
        worker.close()
    assert _states(conn) == {"running": 1}


def test_claimed_rows_become_jobs_field_by_field(conn):
    """Claimed rows map to Job positionally; a claim query whose columns
    drift from Job's fields fails loudly instead of mixing them up."""
    job_id = pulsed.enqueue(conn, "quick", {"k": "v"}, priority=3, max_attempts=4,
                            idempotency_key="key-1", queue="q1")
    conn.commit()
    [job] = Store(conn).claim(owner="w1", limit=5, lease_ttl=60)
    conn.commit()
    row = conn.execute("SELECT created_at, run_at, lease_token FROM pulse_jobs WHERE id = %s",
                       (job_id,)).fetchone()
    assert (job.id, job.type, job.queue, job.payload, job.priority, job.attempt, job.max_attempts,
            job.idempotency_key, job.timeout) == (job_id, "quick", "q1", {"k": "v"}, 3, 1, 4,
                                                  "key-1", None)
    assert (job.created_at, job.run_at, job.lease_token) == row
    with pytest.raises(RuntimeError, match="a claim returned columns"):
        _claimed_jobs(conn.execute("SELECT 1 AS id, 'quick' AS queue"))


@pytest.mark.parametrize("claim_session", [False, True])
def test_a_failed_complete_and_claim_writes_nothing_and_the_connection_recovers(
        conn, two_of_four_claimed, claim_session):
    worker_conn, store, first = two_of_four_claimed
    with pytest.raises(psycopg.errors.InvalidRowCountInLimitClause):
        store.complete_and_claim(first, W1, limit=-1,  # the claim fails
                                 claim_session=claim_session)
    assert worker_conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert _states(conn) == {"running": 2, "available": 2}  # the completion went with it
    held, second = store.complete_and_claim(first, W1, limit=2)
    assert held == {j.id for j in first} and len(second) == 2
    assert _states(conn) == {"completed": 2, "running": 2}


def test_a_worker_whose_session_options_were_dropped_sets_plan_settings_per_claim(
        dsn, conn, monkeypatch, caplog):
    """A pooler may drop the startup options: the worker notices and each
    claim then carries its plan settings (BEGIN, settings, claim, COMMIT)."""
    monkeypatch.setattr("pulsed.worker_connection.CLAIM_SESSION", "")
    pulsed.enqueue(conn, "quick")
    conn.commit()
    worker = Worker(dsn, WorkerOptions(owner="w1"), registry=_registry(quick=lambda job: None))
    try:
        with caplog.at_level("WARNING", logger="pulsed.worker"):
            worker.connection()
        assert "options were not applied" in caplog.text
        trace, jobs = _traced(worker.connection(), lambda: worker.claim(5))
        assert len(jobs) == 1 and _statements_sent(trace) == 4, trace
        assert "enable_seqscan" in trace
    finally:
        worker.close()


def test_a_python_error_between_completion_and_claim_commits_neither(conn, two_of_four_claimed):
    """psycopg ends a pipeline with a Sync even when the block raised. The
    completion is queued before the claim's parameters are adapted (in
    the pipelined shape, without the claim session): if that fails in
    Python, the completion must not be committed on its own (the worker
    keeps it pending and sends it again)."""
    worker_conn, store, first = two_of_four_claimed
    with pytest.raises(psycopg.ProgrammingError, match="cannot adapt"):
        store.complete_and_claim(first, W1, limit=object(), claim_session=False)
    assert worker_conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert _states(conn) == {"running": 2, "available": 2}
    held, second = store.complete_and_claim(first, W1, limit=2)
    assert held == {j.id for j in first} and len(second) == 2


def test_claims_read_tuples_whatever_the_connections_row_factory(dsn, conn):
    pulsed.enqueue(conn, "quick", {"k": 1})
    conn.commit()
    with psycopg.connect(dsn, autocommit=True, row_factory=psycopg.rows.dict_row) as dict_conn:
        [job] = Store(dict_conn).claim(owner="w1", limit=2, lease_ttl=60)
    assert (job.type, job.payload, job.attempt) == ("quick", {"k": 1}, 1)


def test_wakeups_queued_while_busy_cost_one_claim_not_one_each(dsn, conn):
    """Every enqueue NOTIFYs. Wake-ups that pile up while the worker is at
    something else must not replay as hundreds of empty claims."""
    worker = Worker(dsn, WorkerOptions(owner="w1", prefetch=10, poll_interval=30.0),
                    registry=_registry(quick=lambda job: None))
    assert worker.claim(10, listen=True) == []  # idle: listening from here
    with psycopg.connect(dsn, autocommit=True) as other:
        for _ in range(300):
            other.execute("SELECT pg_notify('pulse_jobs', 'default')")
    pulsed.enqueue(conn, "quick")
    conn.commit()
    claims = _count_claims(worker)
    stop_at = time.monotonic() + 1.0
    worker.run(should_stop=lambda: time.monotonic() > stop_at)
    assert claims[0] == 1
    assert len(claims) <= 3, claims[:10]  # the job, writing its completion, one wake-up


def _listening(worker: Worker) -> list[str]:
    """The wake-up channel, if listened to (pulse_cancel always is)."""
    channels = [r[0] for r in worker.connection().execute("SELECT pg_listening_channels()")]
    assert "pulse_cancel" in channels
    return [c for c in channels if c != "pulse_cancel"]


def test_a_worker_listens_only_while_it_may_idle(dsn, conn):
    """A busy worker's backend is not signalled by every enqueue: a full
    batch (more jobs were waiting) stops it listening; the claim before a
    wait starts it again; small batches leave it as it is."""
    pulsed.enqueue_many(conn, [{"type": "quick"}] * 5)
    conn.commit()
    worker = Worker(dsn, WorkerOptions(owner="w1", prefetch=10, poll_interval=30.0),
                    registry=_registry(quick=lambda job: None))
    assert len(worker.claim(2, listen=True)) == 2 and _listening(worker) == ["pulse_jobs"]
    assert len(worker.claim(2)) == 2 and _listening(worker) == []  # after a full batch
    assert len(worker.claim(10)) == 1 and _listening(worker) == []
    assert worker.claim(10) == [] and _listening(worker) == []
    assert worker.claim(10, listen=True) == [] and _listening(worker) == ["pulse_jobs"]
    pulsed.enqueue(conn, "quick")
    conn.commit()
    assert len(worker.claim(10)) == 1 and _listening(worker) == ["pulse_jobs"]  # not full
    worker.close()


def test_an_idle_worker_hears_every_enqueue_after_busy_and_light_spells(dsn, conn):
    """Full batches (not listening) then single jobs (listening again),
    three times over: each single job starts long before the 30 s poll."""
    started: dict[int, float] = {}
    idle = threading.Event()

    class Sink:
        def job_started(self, job, deadline) -> None:
            idle.clear()

        def job_finished(self, job, jobs_done) -> None:
            pass

        def jobs_cleared(self, jobs) -> None:
            pass

        def idle(self) -> None:
            idle.set()

    worker = Worker(dsn, WorkerOptions(owner="w1", prefetch=5, poll_interval=30.0),
                    registry=_registry(quick=lambda job: started.setdefault(
                        job.payload["i"], time.monotonic())), status=Sink())
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, kwargs={"should_stop": stop.is_set})
    thread.start()
    try:
        i = 0
        for _ in range(3):
            pulsed.enqueue_many(conn, [{"type": "quick", "payload": {"i": i + k}}
                                       for k in range(20)])
            conn.commit()
            i += 20
            wait_until(lambda: len(started) == i, message="the busy spell ran")
            for _ in range(3):
                # set when it waits; each job_started clears it
                wait_until(idle.is_set, message="the worker waits for jobs")
                sent = time.monotonic()
                pulsed.enqueue(conn, "quick", {"i": i})
                conn.commit()
                wait_until(lambda: i in started, timeout=20, message=f"job {i} started")
                assert started[i] - sent < 2.0  # woken by its NOTIFY, not the poll
                i += 1
    finally:
        stop.set()
        thread.join(10)


def test_a_wakeup_during_an_empty_claim_is_not_lost(dsn, conn):
    """A job committed while the claim that found nothing was in flight:
    its NOTIFY is waiting when the worker starts to wait, so it claims again
    at once instead of sleeping out the poll interval."""
    worker = Worker(dsn, WorkerOptions(owner="w1", prefetch=10, poll_interval=30.0),
                    registry=_registry(quick=lambda job: None))
    assert worker.claim(10) == []
    pulsed.enqueue(conn, "quick")
    conn.commit()
    wait_until(lambda: worker.connection().execute("SELECT 1") is not None)  # reads the NOTIFY
    started = time.monotonic()
    worker.wait_for_jobs(30.0)
    assert time.monotonic() - started < 1.0
    assert len(worker.claim(10)) == 1
    worker.close()


def test_a_connection_cut_right_after_a_claim_still_runs_the_claimed_jobs(dsn, conn, monkeypatch):
    """The claim committed and its rows came back, then the worker's socket
    was cut (shutdown) before it dropped its queued wake-ups, so that read
    fails. The held jobs must still run (their completions go out after the
    reconnect), not stay `running` under leases the keeper renews for ever."""
    pulsed.enqueue_many(conn, [{"type": "quick"}] * 4)
    conn.commit()
    worker = Worker(dsn, WorkerOptions(owner="w1", prefetch=10, poll_interval=30.0),
                    registry=_registry(quick=lambda job: None))
    worker._avg_duration = 0.0001  # claim all four at once
    worker.connection()
    worker._listen()  # idle and listening, as before a wake-up
    original = Store.complete_and_claim
    cut: list[int] = []

    def claim_then_cut(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if not cut and result[1]:
            cut.append(len(result[1]))
            with socket.socket(fileno=os.dup(self.conn.pgconn.socket)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        return result

    monkeypatch.setattr(Store, "complete_and_claim", claim_then_cut)
    assert worker.run(stop_when_idle=True) == 4
    assert cut == [4]
    assert _states(conn) == {"completed": 4}


def test_completions_survive_a_claim_that_cannot_connect(dsn, conn):
    """Found by the PostgreSQL-restart chaos test: a claim that failed to
    reconnect lost the completions it was to send, and the lease keeper
    renewed those jobs' leases for ever (they stayed `running`)."""
    pulsed.enqueue_many(conn, [{"type": "quick"}] * 3)
    conn.commit()
    worker = Worker(dsn, WorkerOptions(owner="w1", prefetch=10),
                    registry=_registry(quick=lambda job: None))
    worker.run_batch(worker.claim(10))
    assert _states(conn) == {"running": 3}  # done, not yet written
    worker.close()
    worker.dsn = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"  # the server is down
    with pytest.raises(psycopg.OperationalError):
        worker.claim(10)
    worker.dsn = dsn  # back up
    assert worker.claim(10) == []
    assert _states(conn) == {"completed": 3}
    worker.close()


def test_a_claim_whose_reply_was_lost_does_not_use_up_an_attempt(dsn, conn, monkeypatch):
    """The claim commits on the server, then the connection dies before its
    reply arrives (issue 23 item 8): the worker never learns it holds the
    job. With max_attempts = 1 the expired lease used to fail the job
    without a run; the worker gives such jobs back after it reconnects, and
    runs the job with the attempt it still has."""
    job_id = pulsed.enqueue(conn, "quick", {}, max_attempts=1)
    conn.commit()
    ran: list[int] = []
    worker = Worker(dsn, WorkerOptions(owner="node/worker-1/123", lease_ttl=1, sole_owner=True),
                    registry=_registry(quick=lambda job: ran.append(job.attempt)))
    original = Store.complete_and_claim
    lost: list[int] = []

    def commit_then_lose_the_reply(self, *args, **kwargs):
        held, jobs = original(self, *args, **kwargs)  # committed
        if jobs and not lost:
            lost.extend(job.id for job in jobs)
            with socket.socket(fileno=os.dup(self.conn.pgconn.socket)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return held, jobs

    monkeypatch.setattr(Store, "complete_and_claim", commit_then_lose_the_reply)
    worker.run(stop_when_idle=True)

    assert lost == [job_id]
    record = Store(conn).get_job(job_id)
    assert record.state.value == "completed", record
    assert ran == [1] and record.attempt == 1
    assert [a.outcome for a in record.attempts] == ["completed"]
    from tests.chaos.harness import record_result
    record_result(fault="the connection cut right after a claim committed (its reply lost)",
                  load="1 job, max_attempts 1, lease_ttl 1 s", lost=0, stuck=0, duplicates=0,
                  recovery_s=None, attempts_used=record.attempt,
                  outcomes=[a.outcome for a in record.attempts])


def _jobs_total(job_type: str, outcome: str) -> float:
    from pulsed import metrics
    value = metrics.local_registry().get_sample_value(
        "pulse_jobs_total", {"type": job_type, "queue": "default", "outcome": outcome})
    return value or 0.0


def test_a_completion_the_lease_fence_refuses_is_counted_lost_not_completed(dsn, conn):
    """/metrics counts what was written: a completion whose lease was taken
    over before it was written is `lost`, the others `completed`."""
    pulsed.enqueue_many(conn, [{"type": "fenced_metric"}] * 3)
    conn.commit()
    worker = Worker(dsn, WorkerOptions(owner="w1", prefetch=10),
                    registry=_registry(fenced_metric=lambda job: None))
    worker._avg_duration = 0.0001  # claim all three at once
    completed = _jobs_total("fenced_metric", "completed")
    lost = _jobs_total("fenced_metric", "lost")
    jobs = worker.claim(10)
    worker.run_batch(jobs)
    assert _jobs_total("fenced_metric", "completed") == completed  # not written yet
    conn.execute("UPDATE pulse_jobs SET lease_token = gen_random_uuid() WHERE id = %s",
                 (jobs[0].id,))  # reaped and claimed again elsewhere, say
    worker.flush()
    assert _jobs_total("fenced_metric", "completed") == completed + 2
    assert _jobs_total("fenced_metric", "lost") == lost + 1
    worker.close()


IDLE_PROBE = """
import sys
import pulsed
from pulsed.worker import Worker, WorkerOptions

registry = pulsed.HandlerRegistry()
registry.register("never", lambda job: None)
worker = Worker(sys.argv[1], WorkerOptions(owner="idle", concurrency=int(sys.argv[2])),
                registry=registry)
seen = []
original = worker.wait_for_jobs

def waiting(timeout, should_stop=lambda: False):
    seen.append("prometheus_client" in sys.modules)
    return original(0.01, should_stop)

worker.wait_for_jobs = waiting
assert "prometheus_client" not in sys.modules
worker.run(should_stop=lambda: len(seen) >= 2)
print(seen)
"""


@pytest.mark.parametrize("concurrency", [1, 4])
def test_an_idle_worker_builds_its_metrics_before_its_first_job_finishes(dsn, concurrency):
    """prometheus_client's import (15 ms; 50-90 ms with 8 workers forked at
    once) happens while the worker waits idle, not on the way out of the
    first job it picks up, where it held up the jobs claimed with it."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", IDLE_PROBE, dsn, str(concurrency)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["[True,", "True]"]
