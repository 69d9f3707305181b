"""The leader's maintenance duties (pulsed/maintenance/) against a real database.

Each duty's run_once() does its work for the current leader, and nothing at
all for a leader whose lease was taken over under it (the term fence), even
while its in-memory Leadership still trusts the lease. Cron ticks are
enqueued once each across leaders; pruning frees history and idempotency
keys; the process registry heartbeats, forgets and prunes.
"""

from __future__ import annotations

import itertools
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

import pulsed
from pulsed.config import Config, CronEntry, SchedulerConfig
from pulsed.db.store import Store
from pulsed.jobs import Job, JobState
from pulsed.leadership import Leadership
from pulsed.maintenance import (
    CronEnqueuer,
    Promoter,
    Pruner,
    Reaper,
    RegistryPruner,
    Vacuumer,
    leader_duties,
)
from pulsed.master.releases import LeaseReleases, dead_worker_releases
from pulsed.master.table import Child
from pulsed.node import worker_owner
from tests.pg import wait_until

pytestmark = pytest.mark.timeout(60)

UTC = timezone.utc
TTL = 30.0
HOUR = 3600.0
DAY = 86400.0
OWNER = "node-x/worker-0/4242"
_queues = itertools.count()


# -- fixtures and helpers --------------------------------------------------------------


@pytest.fixture
def store(conn: psycopg.Connection) -> Store:
    return Store(conn)


@pytest.fixture
def leader(store: Store) -> Leadership:
    lead = Leadership("node-a/100", TTL)
    assert lead.refresh(store)
    return lead


def depose(conn: psycopg.Connection) -> None:
    """Move the lease row under the leader: someone else holds a newer term."""
    conn.execute("UPDATE pulse_leader SET leader_id = 'someone-else', term = term + 1")


def new_job(store: Store, **kwargs: Any) -> tuple[int, str]:
    """An available job alone in its own queue (so a claim picks exactly it)."""
    queue = f"q{next(_queues)}"
    return pulsed.enqueue(store.conn, "t", {}, queue=queue, **kwargs), queue


def running_job(store: Store, **kwargs: Any) -> Job:
    job_id, queue = new_job(store, **kwargs)
    [job] = store.claim(owner=OWNER, limit=1, lease_ttl=TTL, queues=[queue])
    assert job.id == job_id
    return job


def expire_lease(conn: psycopg.Connection, job_id: int) -> None:
    conn.execute("UPDATE pulse_jobs SET lease_expires_at = now() - interval '1 second'"
                 " WHERE id = %s", (job_id,))


def expired_job(store: Store, **kwargs: Any) -> int:
    job = running_job(store, **kwargs)
    expire_lease(store.conn, job.id)
    return job.id


def due_scheduled_job(store: Store) -> int:
    job_id, _ = new_job(store, delay=HOUR)
    assert state_of(store, job_id) == "scheduled"
    store.conn.execute("UPDATE pulse_jobs SET run_at = now() - interval '1 second'"
                       " WHERE id = %s", (job_id,))
    return job_id


def make_due(store: Store, job_id: int) -> None:
    """Pass a retryable job's backoff and promote it (as the Promoter would)."""
    store.conn.execute("UPDATE pulse_jobs SET run_at = now() - interval '1 second'"
                       " WHERE id = %s", (job_id,))
    assert [r["id"] for r in store.promote_due()] == [job_id]


def retryable_job(store: Store, *, backoff: float = 0.0) -> int:
    job = running_job(store)
    assert store.record_error(job, retry=True, backoff=backoff, outcome="error",
                              error_class="Boom", message="boom", traceback=None) \
        == JobState.RETRYABLE
    return job.id


def finished_job(store: Store, state: str, *, age: float, **kwargs: Any) -> int:
    """A job that finished `age` seconds ago in `state` (failed ones have an
    attempt row, as real failures do)."""
    if state == "cancelled":
        job_id, _ = new_job(store, **kwargs)
        assert store.cancel(job_id)
    else:
        job = running_job(store, **kwargs)
        job_id = job.id
        if state == "completed":
            assert store.complete([job]) == {job_id}
        else:
            assert store.record_error(job, retry=False, backoff=0, outcome="error",
                                      error_class="Boom", message="boom",
                                      traceback=None) == JobState.FAILED
    assert state_of(store, job_id) == state
    store.conn.execute("UPDATE pulse_jobs SET finished_at = now() - make_interval(secs => %s)"
                       " WHERE id = %s", (age, job_id))
    return job_id


def state_of(store: Store, job_id: int) -> str | None:
    record = store.get_job(job_id, with_attempts=False)
    return record.state.value if record else None


def outcomes_of(store: Store, job_id: int) -> list[str]:
    return [a.outcome for a in store.get_job(job_id).attempts]


def attempt_rows(conn: psycopg.Connection, job_id: int) -> int:
    return conn.execute("SELECT count(*) FROM pulse_job_attempts WHERE job_id = %s",
                        (job_id,)).fetchone()[0]


def snapshot(conn: psycopg.Connection) -> dict[str, list[tuple]]:
    """Every row a maintenance duty could touch."""
    return {
        "jobs": conn.execute("SELECT * FROM pulse_jobs ORDER BY id").fetchall(),
        "attempts": conn.execute("SELECT * FROM pulse_job_attempts ORDER BY id").fetchall(),
        "processes": conn.execute(
            "SELECT * FROM pulse_processes ORDER BY node_id, role, idx").fetchall(),
        "cron_ticks": conn.execute("SELECT * FROM pulse_cron_ticks ORDER BY name, tick").fetchall(),
        "leader": conn.execute("SELECT * FROM pulse_leader").fetchall(),
    }


def listener(dsn: str) -> psycopg.Connection:
    listen = psycopg.connect(dsn, autocommit=True)
    listen.execute("LISTEN pulse_jobs")
    return listen


def notified_queues(listen: psycopg.Connection) -> set[str]:
    return {n.payload for n in listen.notifies(timeout=0.5)}


def floor_to(moment: datetime, seconds: int) -> datetime:
    return datetime.fromtimestamp(int(moment.timestamp()) // seconds * seconds, tz=UTC)


class Clock:
    """An injectable wall clock for CronEnqueuer."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def cron_jobs(conn: psycopg.Connection, name: str) -> list[tuple[int, str]]:
    """(id, idempotency key) of the jobs enqueued for cron entry `name`."""
    return conn.execute("SELECT id, idempotency_key FROM pulse_jobs"
                        " WHERE idempotency_key LIKE %s ORDER BY id",
                        (f"cron:{name}:%",)).fetchall()


def enqueued_ticks(conn: psycopg.Connection, name: str) -> list[datetime]:
    """The tick of every job enqueued for `name` (from its idempotency key)."""
    prefix = f"cron:{name}:"
    return sorted(datetime.fromisoformat(key[len(prefix):]) for _, key in cron_jobs(conn, name))


def claimed_ticks(conn: psycopg.Connection, name: str) -> list[tuple[datetime, int | None]]:
    return conn.execute("SELECT tick, job_id FROM pulse_cron_ticks WHERE name = %s"
                        " ORDER BY tick", (name,)).fetchall()


def every_entry(name: str = "beat", seconds: float = 10, **kwargs: Any) -> CronEntry:
    return CronEntry(name=name, type="noop", every=seconds, **kwargs)


# -- a world with work for every duty, and the fencing test ------------------------------

BEAT = every_entry("beat", 60)


@pytest.fixture
def world(store: Store, conn: psycopg.Connection) -> dict[str, Any]:
    """Something for each duty to do: due jobs, an expired lease, finished
    jobs past retention, a dead node, a due cron tick and an old one."""
    now = datetime.now(UTC)
    tick = floor_to(now, 60)
    conn.execute("INSERT INTO pulse_cron_ticks (name, tick) VALUES (%s, %s), (%s, %s)",
                 ("beat", tick - timedelta(minutes=1), "beat", now - timedelta(days=9)))
    store.processes_heartbeat("gone-node", [{"role": "master", "idx": 0, "pid": 1}])
    conn.execute("UPDATE pulse_processes SET heartbeat_at = now() - interval '10 minutes'")
    store.processes_heartbeat("live-node", [{"role": "master", "idx": 0, "pid": 2}])
    return {
        "scheduled": due_scheduled_job(store),
        "retryable": retryable_job(store),
        "expired": expired_job(store),
        "completed": finished_job(store, "completed", age=2 * DAY),
        "failed": finished_job(store, "failed", age=30 * DAY),
        "cancelled": finished_job(store, "cancelled", age=30 * DAY),
        "clock": Clock(tick + timedelta(seconds=1)),
        "tick": tick,
    }


def duty_named(name: str, world: dict[str, Any]):
    return {
        "Promoter": lambda: Promoter(),
        "Reaper": lambda: Reaper(),
        "Pruner": lambda: Pruner.from_config(Config()),
        "RegistryPruner": lambda: RegistryPruner(),
        "CronEnqueuer": lambda: CronEnqueuer([BEAT], clock=world["clock"]),
    }[name]()


DUTIES = ["Promoter", "Reaper", "Pruner", "RegistryPruner", "CronEnqueuer"]


@pytest.mark.parametrize("duty", DUTIES)
def test_a_deposed_leader_changes_nothing(duty, world, store, conn, leader, dsn):
    depose(conn)
    assert leader.is_leader, "the in-memory Leadership still trusts its lease"
    before = snapshot(conn)
    listen = listener(dsn)
    try:
        assert duty_named(duty, world).run_once(store, leader) == 0
        assert snapshot(conn) == before
        assert notified_queues(listen) == set()
    finally:
        listen.close()


def test_the_same_duties_do_their_work_for_the_current_leader(world, store, conn, leader):
    done = {name: duty_named(name, world).run_once(store, leader) for name in DUTIES}
    assert done == {"Promoter": 2, "Reaper": 1, "Pruner": 3, "RegistryPruner": 1,
                    "CronEnqueuer": 1}
    assert state_of(store, world["scheduled"]) == "available"
    assert state_of(store, world["retryable"]) == "available"
    # Reaped after the Promoter ran: retryable, its crash backoff not yet passed.
    assert state_of(store, world["expired"]) == "retryable"
    for gone in ("completed", "failed", "cancelled"):
        assert state_of(store, world[gone]) is None
    assert [n["node_id"] for n in store.nodes_alive(3600)] == ["live-node"]
    assert enqueued_ticks(conn, "beat") == [world["tick"]]
    # The 9-day-old tick went; the newest is always kept.
    assert [t for t, _ in claimed_ticks(conn, "beat")] == [
        world["tick"] - timedelta(minutes=1), world["tick"]]


def test_a_leadership_that_knows_it_lost_changes_nothing(world, store, conn):
    """A scheduler whose refresh found the lease taken has term None; its
    duties must not fall back to unfenced writes."""
    holder = Leadership("node-b/200", TTL)
    assert holder.refresh(store)
    follower = Leadership("node-a/100", TTL)
    assert follower.refresh(store) is False and follower.term is None
    before = snapshot(conn)
    written = {name: duty_named(name, world).run_once(store, follower) for name in DUTIES}
    assert written == dict.fromkeys(DUTIES, 0)
    assert snapshot(conn) == before


def test_leader_duties_are_configured_from_the_config():
    config = Config(scheduler=SchedulerConfig(interval=0.25, retention_completed=0.0),
                    cron=(BEAT,))
    duties = {type(d).__name__: d for d in leader_duties(config, "postgresql:///x")}
    assert set(duties) == {*DUTIES, "Vacuumer", "StatsRollup"}
    assert (duties["Vacuumer"].dsn, duties["Vacuumer"].dead_rows) == ("postgresql:///x", 50_000)
    assert duties["Promoter"].interval == duties["Reaper"].interval == 0.25
    assert duties["CronEnqueuer"].entries == (BEAT,)
    assert duties["Pruner"].retention == {"completed": 0.0, "failed": 7 * DAY,
                                          "cancelled": 7 * DAY}


# -- Promoter ------------------------------------------------------------------------------


def test_promoter_makes_due_scheduled_and_retryable_jobs_available(store, leader, dsn):
    due = [due_scheduled_job(store), retryable_job(store)]
    later = [new_job(store, delay=HOUR)[0], retryable_job(store, backoff=HOUR)]
    listen = listener(dsn)
    try:
        assert Promoter().run_once(store, leader) == 2
        queues = {store.get_job(i, with_attempts=False).queue for i in due}
        assert notified_queues(listen) == queues
    finally:
        listen.close()
    assert [state_of(store, i) for i in due] == ["available", "available"]
    assert [state_of(store, i) for i in later] == ["scheduled", "retryable"]
    assert Promoter().run_once(store, leader) == 0


def test_promoter_works_in_batches(store, leader):
    jobs = [due_scheduled_job(store) for _ in range(5)]
    promoter = Promoter(batch=2)
    assert [promoter.run_once(store, leader) for _ in range(4)] == [2, 2, 1, 0]
    assert {state_of(store, i) for i in jobs} == {"available"}


# -- Reaper ----------------------------------------------------------------------------------


def test_reaper_takes_back_expired_leases_and_records_lease_expired(store, conn, leader, dsn):
    retry = expired_job(store)
    last_try = expired_job(store, max_attempts=1)
    live = running_job(store).id
    listen = listener(dsn)
    try:
        assert Reaper().run_once(store, leader) == 2
        assert notified_queues(listen)
    finally:
        listen.close()

    record = store.get_job(retry)
    assert record.state == JobState.RETRYABLE
    assert record.attempt == 1 and record.finished_at is None
    assert "lease expired" in record.last_error
    [attempt] = record.attempts
    assert (attempt.attempt, attempt.outcome, attempt.worker) == (1, "lease_expired", OWNER)

    record = store.get_job(last_try)
    assert record.state == JobState.FAILED and record.finished_at is not None
    assert [a.outcome for a in record.attempts] == ["lease_expired"]

    assert state_of(store, live) == "running"
    assert conn.execute("SELECT lease_token IS NOT NULL FROM pulse_jobs WHERE id = %s",
                        (live,)).fetchone()[0]
    assert Reaper().run_once(store, leader) == 0


def test_a_reaped_job_is_claimed_again_and_the_old_lease_is_dead(store, leader):
    job = running_job(store)
    expire_lease(store.conn, job.id)
    assert Reaper().run_once(store, leader) == 1
    queue = store.get_job(job.id, with_attempts=False).queue
    assert state_of(store, job.id) == "retryable"
    assert store.claim(owner="node-y/worker-0/1", limit=1, lease_ttl=TTL, queues=[queue]) == []
    make_due(store, job.id)
    [again] = store.claim(owner="node-y/worker-0/1", limit=1, lease_ttl=TTL, queues=[queue])
    assert again.id == job.id and again.attempt == 2
    assert store.complete([job]) == set(), "the first worker's late completion must be fenced"
    assert store.complete([again]) == {job.id}
    assert outcomes_of(store, job.id) == ["lease_expired", "completed"]


def db_clock(conn: psycopg.Connection) -> datetime:
    return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def test_a_reaped_job_waits_out_the_crash_backoff(store, conn, leader):
    """Attempt 1 taken back: retryable, due 2 s (+-25% jitter) after the reap."""
    job_id = expired_job(store, max_attempts=5)
    before = db_clock(conn)
    assert Reaper().run_once(store, leader) == 1
    after = db_clock(conn)
    record = store.get_job(job_id)
    assert (record.state, record.attempt, record.finished_at) == (JobState.RETRYABLE, 1, None)
    assert before + timedelta(seconds=1.5) <= record.run_at <= after + timedelta(seconds=2.5)
    assert [(a.attempt, a.outcome) for a in record.attempts] == [(1, "lease_expired")]


def test_an_interrupted_attempt_is_given_back_and_recorded(store, conn):
    job = running_job(store, max_attempts=5)
    released = store.release_owners([OWNER], outcome="interrupted", message="stopped by operator",
                                    error_class="Interrupted")
    assert [(r["id"], r["state"], r["poisoned"]) for r in released] == [
        (job.id, "available", False)]
    record = store.get_job(job.id)
    assert (record.state, record.attempt, record.finished_at) == (JobState.AVAILABLE, 0, None)
    assert record.run_at <= db_clock(conn)
    [attempt] = record.attempts
    assert (attempt.attempt, attempt.outcome, attempt.worker, attempt.error_class,
            attempt.error_message) == (1, "interrupted", OWNER, "Interrupted",
                                       "stopped by operator")
    # Available at once: the next claim runs attempt 1 again.
    [again] = store.claim(owner=OWNER, limit=1, lease_ttl=TTL, queues=[record.queue])
    assert (again.id, again.attempt) == (job.id, 1)


def test_dying_three_times_beside_another_job_poisons_neither(store, dsn):
    # The master's accounting of a worker that crashed running two jobs at
    # once (concurrency > 1), three times: either may have done it, so
    # neither is failed as poison; each attempt is still used.
    queue = f"q{next(_queues)}"
    ids = sorted(pulsed.enqueue(store.conn, "t", {}, queue=queue, max_attempts=20)
                 for _ in range(2))
    releases = LeaseReleases(lambda: psycopg.connect(dsn, autocommit=True), poison_after=3)
    for pid in (101, 102, 103):
        owner = worker_owner("node-x", 1, pid)
        assert sorted(j.id for j in store.claim(owner=owner, limit=2, lease_ttl=TTL,
                                                queues=[queue])) == ids
        for release in dead_worker_releases(Child("worker", 1, 0, pid, 0, 0.0), -11, ids,
                                            "node-x"):
            releases.add(release, 0.0)
        assert releases.pending == []
        assert [state_of(store, job_id) for job_id in ids] == ["retryable"] * 2
        for job_id in ids:
            make_due(store, job_id)
    for job_id in ids:
        record = store.get_job(job_id)
        assert [a.outcome for a in record.attempts] == ["worker_died"] * 3
        assert record.attempt == 3 and "poison" not in (record.last_error or "")


def test_worker_died_three_times_in_a_row_poisons_the_job(store):
    job_id, queue = new_job(store, max_attempts=20)

    def claim() -> Job:
        [job] = store.claim(owner=OWNER, limit=1, lease_ttl=TTL, queues=[queue])
        assert job.id == job_id
        return job

    def worker_dies() -> dict[str, Any]:
        claim()
        [released] = store.release_owners([OWNER], outcome="worker_died",
                                          message="killed by signal 9")
        return released

    # Two crashes, then an attempt that ends with an error: the streak restarts.
    for _ in range(2):
        assert (worker_dies()["state"], state_of(store, job_id)) == ("retryable", "retryable")
        make_due(store, job_id)
    assert store.record_error(claim(), retry=True, backoff=0, outcome="error",
                              error_class="Boom", message="boom", traceback=None) \
        == JobState.RETRYABLE
    make_due(store, job_id)
    for _ in range(2):
        released = worker_dies()
        assert (released["state"], released["poisoned"]) == ("retryable", False)
        make_due(store, job_id)

    released = worker_dies()
    assert (released["state"], released["poisoned"]) == ("failed", True)
    record = store.get_job(job_id)
    assert (record.state, record.attempt) == (JobState.FAILED, 6)
    assert record.finished_at is not None
    assert "poison" in record.last_error and "killed by signal 9" in record.last_error
    assert [(a.attempt, a.outcome) for a in record.attempts] == [
        (1, "worker_died"), (2, "worker_died"), (3, "error"),
        (4, "worker_died"), (5, "worker_died"), (6, "worker_died")]


# -- Pruner ----------------------------------------------------------------------------------


RETENTION = {"completed": HOUR, "failed": DAY, "cancelled": DAY}


def test_pruner_removes_only_finished_jobs_past_their_retention(store, conn, leader):
    old = {
        "completed": finished_job(store, "completed", age=2 * HOUR),
        "failed": finished_job(store, "failed", age=2 * DAY),
        "cancelled": finished_job(store, "cancelled", age=2 * DAY),
    }
    young = {
        "completed": finished_job(store, "completed", age=10 * 60),
        "failed": finished_job(store, "failed", age=2 * HOUR),
        "cancelled": finished_job(store, "cancelled", age=2 * HOUR),
    }
    unfinished = [new_job(store)[0], new_job(store, delay=HOUR)[0], running_job(store).id,
                  retryable_job(store, backoff=HOUR)]
    conn.execute("UPDATE pulse_jobs SET created_at = now() - interval '30 days',"
                 " run_at = LEAST(run_at, now() - interval '30 days')"
                 " WHERE state IN ('available', 'running')")
    assert attempt_rows(conn, old["failed"]) == 1

    assert Pruner(RETENTION).run_once(store, leader) == 3
    assert [state_of(store, i) for i in old.values()] == [None, None, None]
    assert attempt_rows(conn, old["failed"]) == 0, "its attempt history goes with it"
    assert [state_of(store, i) for i in young.values()] == ["completed", "failed", "cancelled"]
    assert attempt_rows(conn, young["failed"]) == 1
    assert [state_of(store, i) for i in unfinished] == [
        "available", "scheduled", "running", "retryable"]
    assert Pruner(RETENTION).run_once(store, leader) == 0


def test_pruning_frees_idempotency_keys(store, leader):
    pruned = finished_job(store, "completed", age=2 * HOUR, idempotency_key="report:1")
    kept = finished_job(store, "completed", age=60, idempotency_key="report:2")
    assert pulsed.enqueue(store.conn, "t", idempotency_key="report:1") == pruned
    assert Pruner(RETENTION).run_once(store, leader) == 1
    fresh = pulsed.enqueue(store.conn, "t", idempotency_key="report:1")
    assert fresh != pruned and state_of(store, fresh) == "available"
    assert pulsed.enqueue(store.conn, "t", idempotency_key="report:2") == kept


def test_pruner_with_a_small_batch_still_prunes_everything(store, conn, leader):
    jobs = [finished_job(store, state, age=2 * DAY)
            for _ in range(3) for state in ("completed", "cancelled")]
    pruner = Pruner(RETENTION, batch=2)
    counts = [pruner.run_once(store, leader) for _ in range(4)]
    assert sum(counts) == 6 and counts[-1] == 0
    assert [state_of(store, i) for i in jobs] == [None] * 6


def test_zero_retention_prunes_as_soon_as_finished(store, leader):
    job = finished_job(store, "completed", age=0.5)
    assert Pruner({"completed": 0.0}).run_once(store, leader) == 1
    assert state_of(store, job) is None


# -- the process registry --------------------------------------------------------------------


def registry(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT node_id, role, idx, pid FROM pulse_processes"
                        " ORDER BY node_id, role, idx, pid").fetchall()


def test_processes_heartbeat_registers_refreshes_and_drops_what_is_gone(store, conn):
    store.processes_heartbeat("n1", [
        {"role": "master", "idx": 0, "pid": 10},
        {"role": "worker", "idx": 0, "pid": 11, "info": {"state": "idle"}},
        {"role": "worker", "idx": 1, "pid": 12}])
    assert registry(conn) == [("n1", "master", 0, 10), ("n1", "worker", 0, 11),
                              ("n1", "worker", 1, 12)]
    conn.execute("UPDATE pulse_processes SET heartbeat_at = now() - interval '1 minute',"
                 " started_at = now() - interval '1 hour'")

    store.processes_heartbeat("n1", [
        {"role": "master", "idx": 0, "pid": 10},
        {"role": "worker", "idx": 0, "pid": 21, "info": {"state": "busy"}}])
    rows = conn.execute(
        "SELECT role, idx, pid, info, now() - heartbeat_at < interval '5 seconds',"
        " now() - started_at < interval '5 seconds' FROM pulse_processes ORDER BY role, idx"
    ).fetchall()
    assert rows == [("master", 0, 10, {}, True, False),      # same pid: started_at kept
                    ("worker", 0, 21, {"state": "busy"}, True, True)]  # new pid: restarted


def test_processes_heartbeat_lists_both_generations_while_a_reload_overlaps(store, conn):
    """The old scheduler and worker 1 still run next to their replacements:
    one heartbeat carries both of each (it used to fail as a whole)."""
    old = [{"role": "scheduler", "idx": 0, "pid": 11}, {"role": "worker", "idx": 1, "pid": 12}]
    new = [{"role": "scheduler", "idx": 0, "pid": 21}, {"role": "worker", "idx": 1, "pid": 22}]
    master = [{"role": "master", "idx": 0, "pid": 10}]
    store.processes_heartbeat("n1", master + old + new + new[1:])  # even a repeated row
    assert registry(conn) == [("n1", "master", 0, 10), ("n1", "scheduler", 0, 11),
                              ("n1", "scheduler", 0, 21), ("n1", "worker", 1, 12),
                              ("n1", "worker", 1, 22)]
    store.processes_heartbeat("n1", master + new)  # the old generation left
    assert registry(conn) == [("n1", "master", 0, 10), ("n1", "scheduler", 0, 21),
                              ("n1", "worker", 1, 22)]


def test_processes_heartbeat_of_one_node_leaves_other_nodes_alone(store, conn):
    store.processes_heartbeat("n1", [{"role": "master", "idx": 0, "pid": 10}])
    store.processes_heartbeat("n2", [{"role": "master", "idx": 0, "pid": 20},
                                     {"role": "scheduler", "idx": 0, "pid": 21}])
    store.processes_heartbeat("n1", [{"role": "master", "idx": 0, "pid": 10}])
    assert registry(conn) == [("n1", "master", 0, 10), ("n2", "master", 0, 20),
                              ("n2", "scheduler", 0, 21)]


def test_processes_forget_node(store, conn):
    store.processes_heartbeat("n1", [{"role": "master", "idx": 0, "pid": 10}])
    store.processes_heartbeat("n2", [{"role": "master", "idx": 0, "pid": 20}])
    store.processes_forget_node("n1")
    assert registry(conn) == [("n2", "master", 0, 20)]


def test_nodes_alive_counts_processes_of_nodes_heartbeating_recently(store, conn):
    store.processes_heartbeat("old", [{"role": "master", "idx": 0, "pid": 1}])
    conn.execute("UPDATE pulse_processes SET heartbeat_at = now() - interval '2 minutes'")
    store.processes_heartbeat("n1", [{"role": "master", "idx": 0, "pid": 10},
                                     {"role": "worker", "idx": 0, "pid": 11},
                                     {"role": "scheduler", "idx": 0, "pid": 12}])
    store.processes_heartbeat("n2", [{"role": "master", "idx": 0, "pid": 20}])
    alive = store.nodes_alive(30)
    assert [(n["node_id"], n["processes"]) for n in alive] == [("n1", 3), ("n2", 1)]
    assert all(isinstance(n["heartbeat_at"], datetime) for n in alive)
    assert [n["node_id"] for n in store.nodes_alive(3600)] == ["n1", "n2", "old"]


def test_processes_prune_dead_removes_silent_nodes_for_the_leader(store, conn, leader):
    store.processes_heartbeat("dead", [{"role": "master", "idx": 0, "pid": 1},
                                       {"role": "worker", "idx": 0, "pid": 2}])
    conn.execute("UPDATE pulse_processes SET heartbeat_at = now() - interval '10 minutes'")
    store.processes_heartbeat("alive", [{"role": "master", "idx": 0, "pid": 3}])

    gone = store.processes_prune_dead(120, leader_id=leader.leader_id, term=leader.term)
    assert sorted((r["node_id"], r["role"]) for r in gone) == [("dead", "master"),
                                                               ("dead", "worker")]
    assert registry(conn) == [("alive", "master", 0, 3)]


def test_registry_pruner_prunes_dead_nodes_and_old_cron_ticks(store, conn, leader):
    store.processes_heartbeat("dead", [{"role": "master", "idx": 0, "pid": 1}])
    conn.execute("UPDATE pulse_processes SET heartbeat_at = now() - interval '10 minutes'")
    store.processes_heartbeat("alive", [{"role": "master", "idx": 0, "pid": 3}])
    now = datetime.now(UTC)
    old = [now - timedelta(days=d) for d in (10, 9, 8)]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO pulse_cron_ticks (name, tick) VALUES (%s, %s)",
                        [("x", t) for t in old] + [("y", old[0]), ("y", now)])

    assert RegistryPruner().run_once(store, leader) == 1
    assert registry(conn) == [("alive", "master", 0, 3)]
    assert [t for t, _ in claimed_ticks(conn, "x")] == [old[2]], "each entry keeps its newest"
    assert [t for t, _ in claimed_ticks(conn, "y")] == [now]


def test_processes_prune_dead_by_a_deposed_leader_prunes_nothing(store, conn, leader):
    store.processes_heartbeat("dead", [{"role": "master", "idx": 0, "pid": 1}])
    conn.execute("UPDATE pulse_processes SET heartbeat_at = now() - interval '10 minutes'")
    depose(conn)
    assert store.processes_prune_dead(120, leader_id=leader.leader_id, term=leader.term) == []
    assert RegistryPruner().run_once(store, leader) == 0
    assert registry(conn) == [("dead", "master", 0, 1)]


# -- CronEnqueuer ----------------------------------------------------------------------------


def test_cron_enqueues_a_tick_once_with_its_key_and_records_it(store, conn, leader):
    base = floor_to(datetime.now(UTC), 10)
    clock = Clock(base + timedelta(seconds=0.5))
    cron = CronEnqueuer([every_entry("beat", 10, payload={"k": 1}, priority=3)], clock=clock)

    assert cron.run_once(store, leader) == 1
    [(job_id, key)] = cron_jobs(conn, "beat")
    assert key == f"cron:beat:{base.isoformat()}"
    record = store.get_job(job_id, with_attempts=False)
    assert (record.type, record.payload, record.priority, record.state.value) == (
        "noop", {"k": 1}, 3, "available")
    assert claimed_ticks(conn, "beat") == [(base, job_id)]

    clock.now = base + timedelta(seconds=9.9)
    assert cron.run_once(store, leader) == 0
    clock.now = base + timedelta(seconds=10.2)
    assert cron.run_once(store, leader) == 1
    assert enqueued_ticks(conn, "beat") == [base, base + timedelta(seconds=10)]


def test_a_cron_entry_whose_job_is_refused_leaves_the_others_running(store, conn, leader,
                                                                      caplog):
    # The config refuses such an entry at load; one that slipped through
    # (built here directly) raised out of the scheduler at every tick, and
    # no other entry or duty ran.
    base = floor_to(datetime.now(UTC), 10)
    clock = Clock(base + timedelta(seconds=0.5))
    cron = CronEnqueuer([every_entry("bad", 10, payload={"a": float("nan")}),
                         every_entry("good", 10)], clock=clock)
    assert cron.run_once(store, leader) == 1
    assert [key for _, key in cron_jobs(conn, "good")] == [f"cron:good:{base.isoformat()}"]
    assert cron_jobs(conn, "bad") == []
    clock.now = base + timedelta(seconds=10.5)
    assert cron.run_once(store, leader) == 1
    refusals = [r for r in caplog.records if "cron bad: its job is refused" in r.getMessage()]
    assert len(refusals) == 1 and "payload" in refusals[0].getMessage()


def test_cron_does_nothing_for_a_leadership_that_never_led(store, conn):
    follower = Leadership("node-z/1", TTL)
    cron = CronEnqueuer([every_entry()], clock=Clock(floor_to(datetime.now(UTC), 10)))
    assert cron.run_once(store, follower) == 0
    assert claimed_ticks(conn, "beat") == []


def test_two_leaders_handing_over_never_enqueue_a_tick_twice(dsn, conn):
    entry = every_entry("beat", 1)
    base = floor_to(datetime.now(UTC), 1)
    clock = Clock(base)
    with psycopg.connect(dsn, autocommit=True) as other:
        stores = {"a": Store(conn), "b": Store(other)}
        leads = {"a": Leadership("node-a/1", TTL), "b": Leadership("node-b/2", TTL)}
        crons = {name: CronEnqueuer([entry], clock=clock) for name in stores}

        def hand_over(to: str) -> None:
            conn.execute("UPDATE pulse_leader SET expires_at = now() - interval '1 second'")
            assert leads[to].refresh(stores[to])

        assert leads["a"].refresh(stores["a"])
        terms = []
        for step in range(15):
            if step in (5, 10):
                hand_over("b" if step == 5 else "a")
            terms.append(max(lead.term or 0 for lead in leads.values()))
            for sub in (0.1, 0.6):  # two passes per tick, both leaders, both orders
                clock.now = base + timedelta(seconds=step + sub)
                order = ("a", "b") if step % 2 else ("b", "a")
                for name in order:
                    crons[name].run_once(stores[name], leads[name])
            # The deposed one still trusts its lease in memory all along.
            assert leads["a"].is_leader or leads["b"].is_leader
    assert terms == [1] * 5 + [2] * 5 + [3] * 5
    ticks = enqueued_ticks(conn, "beat")
    assert ticks == [base + timedelta(seconds=s) for s in range(15)]
    assert [t for t, _ in claimed_ticks(conn, "beat")] == ticks


def test_concurrent_enqueuers_of_one_term_race_for_a_tick_and_one_wins(dsn, conn):
    """Two scheduler processes that both believe they lead (same term) must
    still not double a tick: the tick's primary key decides."""
    entry = every_entry("race", 1)
    lead = Leadership("node-a/1", TTL)
    assert lead.refresh(Store(conn))
    base = floor_to(datetime.now(UTC), 1)
    racers = 4
    barrier = threading.Barrier(racers)
    results: list[int] = []

    def race() -> None:
        with psycopg.connect(dsn, autocommit=True) as own:
            cron = CronEnqueuer([entry], clock=Clock(base + timedelta(seconds=0.3)))
            barrier.wait(timeout=10)
            results.append(cron.run_once(Store(own), lead))

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results) == [0] * (racers - 1) + [1]
    assert enqueued_ticks(conn, "race") == [base]


def seed_first_tick(store: Store, leader: Leadership, cron: CronEnqueuer, clock: Clock,
                    tick: datetime) -> None:
    clock.now = tick + timedelta(seconds=0.5)
    assert cron.run_once(store, leader) == 1


def test_catch_up_true_enqueues_every_missed_tick(store, conn, leader):
    base = floor_to(datetime.now(UTC), 10) - timedelta(minutes=5)
    clock = Clock(base)
    cron = CronEnqueuer([every_entry("beat", 10, catch_up=True)], clock=clock)
    seed_first_tick(store, leader, cron, clock, base)
    clock.now = base + timedelta(seconds=50.5)  # no leader for 50 s
    assert cron.run_once(store, leader) == 5
    expected = [base + timedelta(seconds=10 * i) for i in range(6)]
    assert enqueued_ticks(conn, "beat") == expected
    assert [t for t, job in claimed_ticks(conn, "beat") if job is not None] == expected
    assert cron.run_once(store, leader) == 0


def test_catch_up_false_enqueues_only_the_newest_missed_tick(store, conn, leader):
    base = floor_to(datetime.now(UTC), 10) - timedelta(minutes=5)
    clock = Clock(base)
    cron = CronEnqueuer([every_entry("beat", 10, catch_up=False)], clock=clock)
    seed_first_tick(store, leader, cron, clock, base)
    clock.now = base + timedelta(seconds=50.5)
    assert cron.run_once(store, leader) == 1
    assert enqueued_ticks(conn, "beat") == [base, base + timedelta(seconds=50)]
    assert [t for t, _ in claimed_ticks(conn, "beat")] == [base, base + timedelta(seconds=50)]
    assert cron.run_once(store, leader) == 0


def test_catch_up_with_a_cron_expression(store, conn, leader):
    base = floor_to(datetime.now(UTC), 300) - timedelta(hours=2)
    clock = Clock(base)
    cron = CronEnqueuer([CronEntry(name="five", type="noop", schedule="*/5 * * * *",
                                   catch_up=True)], clock=clock)
    seed_first_tick(store, leader, cron, clock, base)
    clock.now = base + timedelta(minutes=20, seconds=30)
    assert cron.run_once(store, leader) == 4
    assert enqueued_ticks(conn, "five") == [base + timedelta(minutes=m) for m in (0, 5, 10, 15, 20)]


@pytest.mark.parametrize("catch_up", [False, True])
def test_a_new_daily_entry_does_not_run_at_once_for_a_tick_hours_ago(store, conn, leader,
                                                                     catch_up):
    day = floor_to(datetime.now(UTC), 86400) - timedelta(days=3)
    clock = Clock(day + timedelta(hours=10))  # deployed at 10:00, the job is for 03:00
    cron = CronEnqueuer([CronEntry(name="nightly", type="noop", schedule="0 3 * * *",
                                   catch_up=catch_up)], clock=clock)
    assert cron.run_once(store, leader) == 0
    assert cron_jobs(conn, "nightly") == []
    # The passed tick is remembered as not to run, so it never runs later.
    assert claimed_ticks(conn, "nightly") == [(day + timedelta(hours=3), None)]
    clock.now = day + timedelta(hours=23, minutes=59)
    assert cron.run_once(store, leader) == 0
    clock.now = day + timedelta(days=1, hours=3, seconds=20)
    assert cron.run_once(store, leader) == 1
    assert enqueued_ticks(conn, "nightly") == [day + timedelta(days=1, hours=3)]


def test_a_new_entry_deployed_right_at_its_tick_runs_it(store, conn, leader):
    base = floor_to(datetime.now(UTC), 60)
    cron = CronEnqueuer([CronEntry(name="minutely", type="noop", schedule="* * * * *")],
                        clock=Clock(base + timedelta(seconds=1)))
    assert cron.run_once(store, leader) == 1
    assert enqueued_ticks(conn, "minutely") == [base]


def test_each_entry_has_its_own_ticks(store, conn, leader):
    base = floor_to(datetime.now(UTC), 60)
    clock = Clock(base + timedelta(seconds=0.5))
    cron = CronEnqueuer([every_entry("fast", 1), every_entry("slow", 60)], clock=clock)
    assert cron.run_once(store, leader) == 2
    clock.now = base + timedelta(seconds=1.5)
    assert cron.run_once(store, leader) == 1
    assert enqueued_ticks(conn, "fast") == [base, base + timedelta(seconds=1)]
    assert enqueued_ticks(conn, "slow") == [base]


def test_cron_catch_up_uses_utc_ticks_whatever_the_session_timezone(store, conn, leader):
    """The last tick comes back from PostgreSQL in the session's TimeZone;
    "0 3 * * *" still means 03:00 UTC (pulsed/cron.py: evaluated in UTC)."""
    conn.execute("SET TimeZone = 'Asia/Tokyo'")
    day = floor_to(datetime.now(UTC), 86400) - timedelta(days=5)
    clock = Clock(day)
    cron = CronEnqueuer([CronEntry(name="nightly", type="noop", schedule="0 3 * * *",
                                   catch_up=True)], clock=clock)
    seed_first_tick(store, leader, cron, clock, day + timedelta(hours=3))
    clock.now = day + timedelta(days=2, hours=3, seconds=30)  # two nights without a leader
    assert cron.run_once(store, leader) == 2
    expected = [day + timedelta(days=d, hours=3) for d in range(3)]
    assert enqueued_ticks(conn, "nightly") == expected
    assert [t for t, _ in claimed_ticks(conn, "nightly")] == expected


# -- Vacuumer ------------------------------------------------------------------------------


def dead_rows(store: Store) -> int:
    store.conn.execute("SELECT pg_stat_force_next_flush()")  # this session's counts, now
    return store.jobs_dead_rows()[0]


def test_vacuumer_vacuums_once_enough_dead_rows_pile_up(store, conn, leader, dsn):
    pulsed.enqueue_many(conn, [{"type": "t"}] * 300)
    jobs = store.claim(owner=OWNER, limit=300, lease_ttl=TTL)
    store.complete(jobs)  # 600 dead versions: the available and the running ones
    wait_until(lambda: dead_rows(store) >= 600, timeout=10, message="dead rows counted")

    assert Vacuumer(dsn, dead_rows=10_000).run_once(store, leader) == 0  # not yet
    vacuumer = Vacuumer(dsn, dead_rows=500)
    assert vacuumer.run_once(store, leader) >= 600
    assert vacuumer.run_once(store, leader) == 0  # one at a time
    vacuumer.wait(30)
    assert not vacuumer.running()
    wait_until(lambda: dead_rows(store) < 100, timeout=10, message="VACUUM removed them")
    assert conn.execute("SELECT vacuum_count FROM pg_stat_user_tables "
                        "WHERE relname = 'pulse_jobs'").fetchone()[0] >= 1


def test_vacuumer_does_nothing_when_off_or_not_leading(store, conn, dsn):
    pulsed.enqueue_many(conn, [{"type": "t"}] * 50)
    store.complete(store.claim(owner=OWNER, limit=50, lease_ttl=TTL))
    follower = Leadership("node-z/1", TTL)
    assert Vacuumer(dsn, dead_rows=1).run_once(store, follower) == 0
    assert Vacuumer(dsn, dead_rows=0).run_once(store, follower) == 0


def test_vacuumer_turns_itself_off_for_a_user_that_does_not_own_the_table(
        store, conn, leader, dsn, caplog):
    pulsed.enqueue_many(conn, [{"type": "t"}] * 20)
    store.complete(store.claim(owner=OWNER, limit=20, lease_ttl=TTL))
    wait_until(lambda: dead_rows(store) >= 20, timeout=10, message="dead rows counted")
    conn.execute("DO $$ BEGIN CREATE ROLE pulse_test_not_owner; "
                 "EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    conn.execute("SET ROLE pulse_test_not_owner")  # PostgreSQL would only warn and skip
    vacuumer = Vacuumer(dsn, dead_rows=1)
    assert vacuumer.run_once(store, leader) == 0
    assert not vacuumer.running()
    assert any("does not own pulse_jobs" in r.getMessage() for r in caplog.records)
    conn.execute("RESET ROLE")
    assert vacuumer.run_once(store, leader) == 0  # off for good: no warning every tick


# -- cron time zones (issue 17) ----------------------------------------------------------


def run_cron_minute_by_minute(store: Store, leader: Leadership, cron: CronEnqueuer,
                              clock: Clock, start: datetime, end: datetime) -> None:
    """The leader's loop over [start, end], run 20 s into every minute."""
    clock.now = start + timedelta(seconds=20)
    while clock.now <= end:
        cron.run_once(store, leader)
        clock.now += timedelta(minutes=1)


@pytest.mark.parametrize("schedule, zone, start, expected", [
    # Berlin, spring forward: 02:30 does not exist, runs at 03:00 CEST
    ("30 2 * * *", "Europe/Berlin", datetime(2026, 3, 28, 22, tzinfo=UTC),
     [datetime(2026, 3, 29, 1, 0, tzinfo=UTC)]),
    # Berlin, fall back: 02:30 comes at 00:30 and 01:30 UTC, runs at the first
    ("30 2 * * *", "Europe/Berlin", datetime(2026, 10, 24, 22, tzinfo=UTC),
     [datetime(2026, 10, 25, 0, 30, tzinfo=UTC)]),
    # New York, fall back: 01:30 comes at 05:30 (EDT) and 06:30 (EST) UTC
    ("30 1 * * *", "America/New_York", datetime(2026, 11, 1, 3, tzinfo=UTC),
     [datetime(2026, 11, 1, 5, 30, tzinfo=UTC)]),
    # New York, spring forward: 01:00 EST exists as on any day
    ("0 1 * * *", "America/New_York", datetime(2026, 3, 8, 3, tzinfo=UTC),
     [datetime(2026, 3, 8, 6, 0, tzinfo=UTC)]),
])
def test_the_leader_enqueues_a_local_time_once_across_daylight_saving(
        store, conn, leader, schedule, zone, start, expected):
    clock = Clock(start)
    cron = CronEnqueuer([CronEntry(name="local", type="noop", schedule=schedule,
                                   timezone=zone)], clock=clock)

    run_cron_minute_by_minute(store, leader, cron, clock, start, start + timedelta(hours=6))

    assert enqueued_ticks(conn, "local") == expected
