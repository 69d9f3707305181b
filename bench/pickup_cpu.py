"""W2's pickup in one process, without the daemon: a Pulse Worker (its
log lines formatted as the daemon's are) beside the probe's statements,
each picking up one job at a time as an enqueue wakes it, and timed from
inside: the wake-up's arrival to the handler's first line, the enqueue
call to it, and the worker thread's CPU per pickup (its claim, the job,
its completion, its wait). CPU time is what this machine's noise moves
least, so this is the A/B for a change on the worker's pickup path; the
harness's W2 remains the figure for the issue.

    python bench/pickup_cpu.py --dsn postgresql://postgres@127.0.0.1:5432/postgres \
        [--jobs 600] [--rounds 3]

Creates two scratch databases on that server (bench_pickup_pulse,
bench_pickup_probe; dropped at the end) and runs the sides alternately,
each round in a fresh process. Prints each round and the medians, p50s
over the jobs of a round leaving out the first 20 (plans and caches
warming up). Imports pulsed from the tree it is in, so running it from a
git worktree of another commit measures that commit.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from round_trips import drop, scratch  # bench/: the scratch databases, made and dropped alike

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this tree's pulsed (run from a worktree: that tree's), not the installed one
SHARED_PEERS = Path(os.environ.get("BENCH_PEERS_DIR", REPO.parent / "shared" / "bench-peers"))
WARM_UP = 20
PAUSE_S = 0.003  # between a job's start and the next enqueue: the worker goes idle
DATABASES = {"pulse": "bench_pickup_pulse", "probe": "bench_pickup_probe"}


class Pickups:
    """The times one side's pickups took: set `woken` when the wake-up is
    read, call started() first thing in the handler."""

    def __init__(self) -> None:
        self.enqueued = 0.0
        self.woken = 0.0
        self.from_enqueue: list[float] = []
        self.from_wakeup: list[float] = []
        self.ran = threading.Event()

    def started(self) -> None:
        now = time.perf_counter()
        self.from_enqueue.append(now - self.enqueued)
        self.from_wakeup.append(now - self.woken)
        self.ran.set()

    def feed(self, enqueue: Callable[[int], object], jobs: int, done: threading.Event) -> None:
        """One job at a time: enqueue, wait for its handler, pause."""
        time.sleep(1.0)  # the worker is idle and listening
        for i in range(jobs):
            self.ran.clear()
            self.enqueued = time.perf_counter()
            enqueue(i)
            if not self.ran.wait(5):
                raise RuntimeError(f"job {i} was not picked up within 5 s")
            time.sleep(PAUSE_S)
        done.set()

    def summary(self, cpu_s: float, jobs: int) -> dict[str, float]:
        return {"wakeup_to_handler_us": _p50_us(self.from_wakeup),
                "enqueue_to_handler_us": _p50_us(self.from_enqueue),
                "worker_cpu_per_pickup_us": round(cpu_s / jobs * 1e6)}


def _p50_us(values: list[float]) -> float:
    return round(statistics.median(values[WARM_UP:]) * 1e6)


def _feeding(pickups: Pickups, enqueue: Callable[[int], object], jobs: int
             ) -> threading.Event:
    done = threading.Event()
    threading.Thread(target=pickups.feed, args=(enqueue, jobs, done), daemon=True).start()
    return done


def run_pulse(dsn: str, jobs: int) -> dict[str, float]:
    import pulsed
    from pulsed.api import HandlerRegistry
    from pulsed.db.migrate import migrate
    from pulsed.logs import setup_logging
    from pulsed.worker import Worker
    from pulsed.worker_options import WorkerOptions

    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn)
        conn.execute("TRUNCATE pulse_jobs CASCADE")
    sys.stderr = open(os.devnull, "w")  # the job lines, formatted and written as the daemon's
    setup_logging("plain", "info")
    pickups = Pickups()

    class TimedWorker(Worker):
        def _route(self, notify: object) -> bool:
            wakeup = super()._route(notify)
            if wakeup:
                pickups.woken = time.perf_counter()
            return wakeup

    registry = HandlerRegistry()
    registry.register("lat", lambda job: pickups.started())
    worker = TimedWorker(dsn, WorkerOptions(owner="pickup-cpu"), registry=registry)
    client = psycopg.connect(dsn, autocommit=True)
    done = _feeding(pickups, lambda i: pulsed.enqueue(client, "lat", {"i": i}), jobs)
    started = time.thread_time()
    worker.run(should_stop=done.is_set)
    return pickups.summary(time.thread_time() - started, jobs)


def run_probe(dsn: str, jobs: int) -> dict[str, float]:
    """The probe's worker loop at one job a claim: its combined statement
    (the last job's completion, the next claim), LISTEN while idle."""
    sys.path.insert(0, str(SHARED_PEERS))
    from peers import batched_forking_peer as probe

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        conn.execute(probe.schema(80))
    pickups = Pickups()
    client = psycopg.connect(dsn, autocommit=True)
    worker = psycopg.connect(dsn, autocommit=True)
    worker.execute("LISTEN bjobs")
    combined = probe.combined(probe.COMPLETE_MOVE)
    done = _feeding(pickups, lambda i: client.execute(probe.INSERT, ("lat", Jsonb({"i": i}))),
                    jobs)
    started = time.thread_time()
    finished: list[int] = []
    token: int | None = None
    while not done.is_set():
        claim_token = secrets.randbits(63)
        rows = worker.execute(combined, {"tok": claim_token, "n": 1, "ids": finished,
                                         "otok": token}).fetchall()
        finished = []
        claimed = [row for row in rows if row[1] is not None]
        if claimed:
            token = claim_token
            for row in claimed:
                pickups.started()
                finished.append(row[1])
            continue
        for _ in worker.notifies(timeout=0.1, stop_after=1):
            pickups.woken = time.perf_counter()
    return pickups.summary(time.thread_time() - started, jobs)


def one_round(side: str, dsn: str, jobs: int) -> dict[str, float]:
    """A side in a fresh process (no caches or plans from the last round)."""
    out = subprocess.run([sys.executable, __file__, "--side", side, "--dsn", dsn,
                          "--jobs", str(jobs)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", required=True, help="a server to create the scratch databases on")
    p.add_argument("--jobs", type=int, default=600)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--side", choices=sorted(DATABASES), help=argparse.SUPPRESS)  # one round
    a = p.parse_args()
    if a.side:
        run = run_pulse if a.side == "pulse" else run_probe
        print(json.dumps(run(a.dsn, a.jobs)))
        return
    dsns = {side: scratch(a.dsn, name) for side, name in DATABASES.items()}
    rounds: dict[str, list[dict[str, float]]] = {side: [] for side in DATABASES}
    try:
        for i in range(a.rounds):
            for side in ("pulse", "probe"):
                rounds[side].append(one_round(side, dsns[side], a.jobs))
                print(f"round {i + 1} {side}: {rounds[side][-1]}", flush=True)
    finally:
        for name in DATABASES.values():
            drop(a.dsn, name)
    medians = {side: {key: statistics.median(r[key] for r in results) for key in results[0]}
               for side, results in rounds.items()}
    print(json.dumps({"medians": medians}, indent=1))


if __name__ == "__main__":
    main()
