"""Concurrent claimers against a real PostgreSQL: every job is handed out
exactly once (SPEC §3 "Claim": atomic, FOR UPDATE SKIP LOCKED), and the
lease fence holds while reapers race with workers."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import psycopg
import pytest

import pulsed
from pulsed.api import HandlerRegistry
from pulsed.db.store import Store
from pulsed.jobs import Job
from pulsed.worker import Worker, WorkerOptions

pytestmark = pytest.mark.usefixtures("fast_commits")

CLAIMERS = 8
JOBS = 10_000
BATCH = 10




def reaped_ids(rows: list[Any]) -> list[int]:
    """The ids reap_expired took back (it returns ids or rows, by version)."""
    return [r if isinstance(r, int) else r["id"] for r in rows]


def batch_option(n: int) -> dict[str, int]:
    """The WorkerOptions keyword for claiming up to n jobs at once."""
    fields = WorkerOptions.__dataclass_fields__
    return {"prefetch": n} if "prefetch" in fields else {"batch_size": n}


def test_concurrent_claimers_get_every_job_exactly_once(dsn: str, conn: psycopg.Connection) -> None:
    ids = pulsed.enqueue_many(conn, [{"type": "t", "payload": {"i": i}} for i in range(JOBS)])
    start = threading.Barrier(CLAIMERS)

    def claimer(n: int) -> tuple[list[int], list[int]]:
        claimed: list[int] = []
        completed: list[int] = []
        with psycopg.connect(dsn, autocommit=True) as own:
            store = Store(own)
            start.wait(timeout=30)
            while batch := store.claim(owner=f"w{n}", limit=BATCH, lease_ttl=60):
                assert len(batch) <= BATCH
                claimed += [j.id for j in batch]
                completed += store.complete(batch)
        return claimed, completed

    with ThreadPoolExecutor(CLAIMERS) as pool:
        results = [f.result(timeout=120) for f in [pool.submit(claimer, n) for n in range(CLAIMERS)]]

    claimed = [job_id for c, _ in results for job_id in c]
    completed = [job_id for _, c in results for job_id in c]
    twice = [job_id for job_id, n in Counter(claimed).items() if n > 1]
    assert twice == [], f"{len(twice)} jobs were claimed more than once, e.g. {twice[:5]}"
    assert sorted(claimed) == sorted(ids), f"{len(set(ids) - set(claimed))} jobs never claimed"
    assert sorted(completed) == sorted(ids)
    assert sum(1 for c, _ in results if c) >= 2, "only one claimer ever got work"
    assert conn.execute(
        "SELECT state::text, attempt, count(*) FROM pulse_jobs GROUP BY 1, 2").fetchall() == [
        ("completed", 1, JOBS)]


def test_concurrent_workers_run_every_job_exactly_once(dsn: str, conn: psycopg.Connection) -> None:
    ids = pulsed.enqueue_many(conn, [{"type": "t", "payload": {"i": i}} for i in range(1_000)])
    ran: list[int] = []  # list.append is atomic under the GIL
    registry = HandlerRegistry()
    registry.register("t", lambda job: ran.append(job.id))
    workers = [Worker(dsn, WorkerOptions(owner=f"w{n}", **batch_option(10)), registry=registry)
               for n in range(4)]

    with ThreadPoolExecutor(len(workers)) as pool:
        done = [f.result(timeout=120) for f in
                [pool.submit(w.run, stop_when_idle=True) for w in workers]]

    assert sum(done) == len(ids)
    assert sorted(ran) == sorted(ids)
    assert conn.execute("SELECT count(*) FROM pulse_jobs WHERE state <> 'completed'").fetchone()[0] == 0


def test_claimers_racing_producers_get_every_job_exactly_once(dsn: str, conn: psycopg.Connection) -> None:
    producers, per_producer, batches = 2, 1_000, 10
    producing = threading.Barrier(producers + 1)
    produced: list[int] = []
    finished = threading.Event()

    def producer(n: int) -> None:
        with psycopg.connect(dsn) as own:
            producing.wait(timeout=30)
            size = per_producer // batches
            for b in range(batches):
                produced.extend(pulsed.enqueue_many(
                    own, [{"type": "t", "payload": {"p": n, "b": b, "i": i}} for i in range(size)]))
                own.commit()

    def claimer(n: int) -> list[int]:
        claimed: list[int] = []
        with psycopg.connect(dsn, autocommit=True) as own:
            store = Store(own)
            while True:
                done_before = finished.is_set()
                batch = store.claim(owner=f"c{n}", limit=BATCH, lease_ttl=60)
                claimed += [j.id for j in batch]
                if batch:
                    store.complete(batch)
                elif done_before:
                    return claimed
                else:
                    own.execute("SELECT pg_sleep(0.005)")  # poll, as a worker would

    with ThreadPoolExecutor(producers + 4) as pool:
        claimers = [pool.submit(claimer, n) for n in range(4)]
        makers = [pool.submit(producer, n) for n in range(producers)]
        producing.wait(timeout=30)
        for f in makers:
            f.result(timeout=60)
        finished.set()
        claimed = [job_id for f in claimers for job_id in f.result(timeout=60)]

    assert len(produced) == producers * per_producer
    assert len(claimed) == len(set(claimed)), "a job was claimed twice"
    assert sorted(claimed) == sorted(produced)


def test_reaper_racing_completions_never_both_take_a_job(dsn: str, conn: psycopg.Connection) -> None:
    """Each claimed job ends exactly one way: its worker completed it (the
    lease held) or the reaper took it back (then the completion is refused)."""
    pulsed.enqueue_many(conn, [{"type": "t", "payload": {"i": i}} for i in range(2_000)])
    holders = 4
    held: list[list[Job]] = []
    for n in range(holders):
        held.append(Store(conn).claim(owner=f"w{n}", limit=500, lease_ttl=60))
    assert sum(len(h) for h in held) == 2_000
    far_future = conn.execute("SELECT now()").fetchone()[0] + timedelta(days=1)
    go = threading.Barrier(holders + 1)

    def completer(jobs: list[Job]) -> set[int]:
        completed: set[int] = set()
        with psycopg.connect(dsn, autocommit=True) as own:
            store = Store(own)
            go.wait(timeout=30)
            for i in range(0, len(jobs), 5):
                completed |= store.complete(jobs[i:i + 5])
        return completed

    def reaper() -> list[int]:
        reaped: list[int] = []
        with psycopg.connect(dsn, autocommit=True) as own:
            store = Store(own)
            go.wait(timeout=30)
            while batch := reaped_ids(store.reap_expired(limit=7, now=far_future)):
                reaped += batch
        return reaped

    with ThreadPoolExecutor(holders + 1) as pool:
        completers = [pool.submit(completer, jobs) for jobs in held]
        reaped = pool.submit(reaper).result(timeout=120)
        completed = set().union(*(f.result(timeout=120) for f in completers))

    assert len(reaped) == len(set(reaped))
    assert completed.isdisjoint(reaped)
    assert completed | set(reaped) == {j.id for h in held for j in h}
    states = dict(conn.execute("SELECT state::text, count(*) FROM pulse_jobs GROUP BY 1").fetchall())
    # A reaped job (attempt 1 of several) waits out its crash backoff.
    assert {"completed": states.get("completed", 0), "retryable": states.get("retryable", 0)} \
        == {"completed": len(completed), "retryable": len(reaped)}
    assert sum(states.values()) == len(completed) + len(reaped), f"other states: {states}"
    assert conn.execute(
        "SELECT count(*) FROM pulse_job_attempts WHERE outcome = 'lease_expired'").fetchone()[0] \
        == len(reaped)


def test_claiming_one_job_at_a_time_stays_fast(conn: psycopg.Connection) -> None:
    """A worker whose jobs take 20 ms or more claims one job at a time, so a
    single-job claim must cost about a millisecond, not a query compilation
    (a plan whose estimated cost is inflated past jit_above_cost gets JIT
    compiled on every claim, on servers built with LLVM)."""
    pulsed.enqueue_many(conn, [{"type": "t", "payload": {"i": i}} for i in range(1_000)])
    store = Store(conn)
    store.claim(owner="w", limit=1, lease_ttl=60)  # warm caches
    timings = []
    for _ in range(15):
        started = time.perf_counter()
        [job] = store.claim(owner="w", limit=1, lease_ttl=60)
        timings.append(time.perf_counter() - started)
    median = sorted(timings)[len(timings) // 2]
    assert median < 0.1, (
        f"a one-job claim takes {median * 1000:.0f} ms (median of 15); "
        f"jit={conn.execute('SHOW jit').fetchone()[0]}")
