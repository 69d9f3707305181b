"""Where W2's pickup latency goes, statement by statement: one job's
enqueue, claim and completion, timed as round trips from Python on an idle
database, for Pulse (its own calls: pulsed.enqueue on an autocommit
connection, Store.complete_and_claim) and for the probe (its statements,
imported from ../shared/bench-peers as they are), interleaved job by job.

    python bench/round_trips.py --dsn postgresql://postgres@127.0.0.1:5432/postgres

Creates two scratch databases on that server (bench_rt_pulse,
bench_rt_probe; dropped at the end). Prints, per step, the median and p90
in microseconds over --jobs jobs (the first 20 left out: connections and
plans warming up), and each step's server-side share measured the same way
with the statement alone (`raw`, no Pulse Python around it), as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

REPO = Path(__file__).resolve().parent.parent
SHARED_PEERS = Path(os.environ.get("BENCH_PEERS_DIR", REPO.parent / "shared" / "bench-peers"))
WARM_UP = 20


def scratch(admin_dsn: str, name: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
    return psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)


def drop(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def timed(samples: dict[str, list[float]], step: str, call: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    value = call()
    samples.setdefault(step, []).append(time.perf_counter() - started)
    return value


class PulseSide:
    """Pulse's calls, as the bench's pulse-autocommit client and a worker
    at concurrency 1 make them (claim session settings applied)."""

    def __init__(self, dsn: str) -> None:
        import pulsed
        from pulsed.db.connect import connect
        from pulsed.db.migrate import migrate
        from pulsed.db.store import CLAIM_SESSION, Store
        from pulsed.db.store_worker import ClaimTerms

        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
        self.enqueue = pulsed.enqueue
        self.client = psycopg.connect(dsn, autocommit=True)
        self.worker = connect(dsn, "worker", instance="round-trips", settings=CLAIM_SESSION)
        self.store = Store(self.worker)
        self.terms = ClaimTerms.of(owner="round-trips", lease_ttl=30.0, aging=60.0)
        # the text the worker sends: its terms written in, the limit a parameter
        self.claim_sql = self.store.claim_texts(self.terms).text("job_claim")
        self.claim_args = {"limit": 1}

    def claim(self, done: list[Any]) -> list[Any]:
        return self.store.complete_and_claim(done, self.terms, limit=1, claim_session=True)[1]

    def one_job(self, i: int, samples: dict[str, list[float]]) -> None:
        timed(samples, "enqueue", lambda: self.enqueue(self.client, "lat", {"i": i}))
        jobs = timed(samples, "claim", lambda: self.claim([]))
        timed(samples, "complete+claim", lambda: self.claim(jobs))
        # the claim statement alone, no Pulse Python around it
        self.enqueue(self.client, "lat", {"i": i})
        rows = timed(samples, "claim raw",
                     lambda: self.worker.execute(self.claim_sql, self.claim_args).fetchall())
        self.worker.execute("UPDATE pulse_jobs SET state = 'completed', finished_at = now(), "
                            "lease_token = NULL, lease_expires_at = NULL WHERE id = %s",
                            (rows[0][0],))

    def close(self) -> None:
        self.client.close()
        self.worker.close()


class ProbeSide:
    """The probe's statements (batched_forking_peer.py, --mode move,
    --flush cte), on autocommit connections as its client and children."""

    def __init__(self, dsn: str) -> None:
        sys.path.insert(0, str(SHARED_PEERS))
        from peers import batched_forking_peer as probe

        self.probe = probe
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(probe.schema(80))
        self.client = psycopg.connect(dsn, autocommit=True)
        self.worker = psycopg.connect(dsn, autocommit=True)
        self.combined = probe.combined(probe.COMPLETE_MOVE)

    def one_job(self, i: int, samples: dict[str, list[float]]) -> None:
        probe = self.probe
        timed(samples, "enqueue",
              lambda: self.client.execute(probe.INSERT, ("lat", Jsonb({"i": i}))))
        token = secrets.randbits(63)
        rows = timed(samples, "claim", lambda: self.worker.execute(
            probe.CLAIM, {"tok": token, "n": 1}).fetchall())
        timed(samples, "complete+claim", lambda: self.worker.execute(self.combined, {
            "tok": secrets.randbits(63), "n": 1, "ids": [r[0] for r in rows],
            "otok": token}).fetchall())

    def close(self) -> None:
        self.client.close()
        self.worker.close()


def summary(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out = {}
    for step, values in samples.items():
        kept = sorted(values[WARM_UP:])
        out[step] = {"p50_us": round(statistics.median(kept) * 1e6),
                     "p90_us": round(kept[int(len(kept) * 0.9)] * 1e6)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", required=True, help="a server to create the scratch databases on")
    p.add_argument("--jobs", type=int, default=500)
    a = p.parse_args()
    pulse = PulseSide(scratch(a.dsn, "bench_rt_pulse"))
    probe = ProbeSide(scratch(a.dsn, "bench_rt_probe"))
    samples: dict[str, dict[str, list[float]]] = {"pulse": {}, "probe": {}}
    try:
        for i in range(a.jobs):
            pulse.one_job(i, samples["pulse"])
            probe.one_job(i, samples["probe"])
    finally:
        pulse.close()
        probe.close()
        drop(a.dsn, "bench_rt_pulse")
        drop(a.dsn, "bench_rt_probe")
    print(json.dumps({side: summary(s) for side, s in samples.items()}, indent=1))


if __name__ == "__main__":
    main()
