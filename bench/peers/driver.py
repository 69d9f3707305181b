"""What every peer driver shares: the Adapter interface, the driver CLI, and
helpers that run inside worker processes.

A driver (``peers/<name>_peer.py``) subclasses Adapter and calls main(); it
runs ONE workload once and writes one JSON object. bench/harness.py runs the
drivers, repeated and interleaved, and summarizes.

    python -m peers.pulse_peer --workload drain --jobs 20000 --workers 2 \
        --dsn postgresql://bench@127.0.0.1:25432/bench_pulse --out run.json
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

LAT_ENV = "BENCH_LAT_DIR"
_lat_fh = None


def record_start(i: int) -> None:
    """First thing a latency job does: append 'i time.time()' to a file of
    its own process in $BENCH_LAT_DIR (line-buffered, no database trip)."""
    t = time.time()
    global _lat_fh
    if _lat_fh is None:
        _lat_fh = open(os.path.join(os.environ[LAT_ENV], f"{os.getpid()}.txt"), "a", buffering=1)
    _lat_fh.write(f"{i} {t:.6f}\n")


async def maybe_await(x: Any) -> Any:
    return await x if inspect.isawaitable(x) else x


class Client:
    """The producer side: one connection; methods may be sync or async."""

    def enqueue(self, payload: dict) -> Any:  # one job (noop), one transaction
        raise NotImplementedError

    def enqueue_latency(self, payload: dict) -> Any:  # one `lat` job
        raise NotImplementedError

    def enqueue_batch(self, payloads: list[dict]) -> Any:  # many noop jobs at once
        raise NotImplementedError

    def enqueue_io_batch(self, payloads: list[dict]) -> Any:  # many W6 jobs ({"i", "ms"})
        raise NotImplementedError

    def close(self) -> Any:
        pass


class Adapter:
    name = "base"
    default_concurrency = 1
    has_batch = True

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def versions(self) -> dict[str, str]:
        return {}

    def worker_model(self) -> str:
        return ""

    def workloads(self) -> dict[str, Callable]:
        from peers import workloads
        return {"drain": workloads.run_drain, "latency": workloads.run_latency,
                "io": workloads.run_io}

    async def reset(self) -> None:
        """An empty, freshly installed queue."""
        raise NotImplementedError

    async def clear(self) -> None:
        """Remove all jobs (between the single and the batch enqueue)."""
        raise NotImplementedError

    async def open_client(self) -> Client:
        raise NotImplementedError

    def count_done(self, total: int) -> int:
        raise NotImplementedError

    def before_drain(self) -> None:
        """ANALYZE (planner statistics) and CHECKPOINT (no checkpoint of the
        enqueue's WAL inside the drain)."""
        import psycopg

        with psycopg.connect(self.args.dsn, autocommit=True) as c:
            c.execute("ANALYZE")
            c.execute("CHECKPOINT")

    def io_slots(self) -> int:
        """W6: how many jobs the workers run at once (the limit is that
        many jobs per --io-ms)."""
        return self.args.workers * self.args.concurrency

    def worker_commands(self, workers: int, concurrency: int) -> list[list[str]]:
        """Default: `workers` copies of `python -m <driver> _worker`."""
        return [[sys.executable, "-m", self.module(), "_worker", "--dsn", self.args.dsn,
                 "--concurrency", str(concurrency), "--index", str(i),
                 *self.worker_extra_args()] for i in range(workers)]

    def worker_extra_args(self) -> list[str]:
        """More `_worker` arguments (see worker_main), e.g. a task cap."""
        return []

    def module(self) -> str:
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        return spec.name if spec is not None else type(self).__module__

    def run_worker(self, concurrency: int, index: int) -> None:
        """The body of the `_worker` sub-command."""
        raise NotImplementedError


class PgMonitor:
    """Mixin: a sync autocommit connection for the done-count queries."""

    _mon = None

    def scalar(self, sql: str, params: tuple = ()) -> int:
        import psycopg

        if self._mon is None:
            self._mon = psycopg.connect(self.args.dsn, autocommit=True)
        return int(self._mon.execute(sql, params).fetchone()[0])


def wipe_public_schema(dsn: str) -> None:
    """Drop and recreate `public`; only in databases named bench*."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as c:
        db = c.execute("select current_database()").fetchone()[0]
        if not db.startswith("bench"):
            raise SystemExit(f"refusing to wipe database {db!r}: its name does not start with 'bench'")
        c.execute("DROP SCHEMA IF EXISTS public CASCADE")
        c.execute("CREATE SCHEMA public")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", required=True, help="the database to use (its queue is emptied)")
    p.add_argument("--workload", default="drain")
    p.add_argument("--jobs", type=int, default=20000)
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--concurrency", type=int, help="per-process concurrency / claim batch")
    p.add_argument("--out", help="result JSON (default: stdout)")
    p.add_argument("--batch-size", type=int, default=1000, help="W1: chunk of the batch enqueue")
    p.add_argument("--single-jobs", type=int, help="W1: single-row enqueues to time (default: N)")
    p.add_argument("--enqueue-autocommit", action="store_true",
                   help="Pulse: single-row enqueue on an autocommit connection (no BEGIN/COMMIT)")
    p.add_argument("--enqueue-in-transaction", action="store_true",
                   help="PgQueuer: each enqueue inside an application transaction (BEGIN … COMMIT)")
    p.add_argument("--io-ms", type=float, default=50.0, help="W6: each job waits this long")
    p.add_argument("--io-handler", choices=["async", "sync"], default="async",
                   help="W6, Pulse: `async def` handler (event loop) or plain `def` (threads)")
    p.add_argument("--max-concurrent-tasks", type=int,
                   help="W6, PgQueuer: run(max_concurrent_tasks=…), its cap on jobs picked per process")
    p.add_argument("--rate", type=float, default=50.0, help="W2: enqueue rate, jobs/s")
    p.add_argument("--idle-before", type=float, default=2.0, help="W2/W5: idle seconds first")
    p.add_argument("--available", type=int, default=100_000, help="W4: available jobs")
    p.add_argument("--finished", type=int, default=500_000, help="W4: completed rows")
    p.add_argument("--duration", type=float, default=60.0, help="W5: seconds of steady enqueue")
    p.add_argument("--slow-fraction", type=float, default=0.5, help="W5: share of 50 ms jobs")
    p.add_argument("--load", type=float, default=0.8, help="W5: enqueue rate / capacity")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after, s")
    p.add_argument("--poll-interval", type=float, default=0.1,
                   help="W1: the done count's poll period, s (the shared harness's flag; "
                        "start-up's resolution)")
    p.add_argument("--done-count", choices=["incremental", "scan"], default="incremental",
                   help="Pulse: how W1 counts completed jobs: through the finished-jobs "
                        "index, each row once (default), or a scan of the table every poll")
    p.add_argument("--pgbouncer", choices=["poll", "listen"],
                   help="Pulse: through a private PgBouncer in transaction mode; workers "
                        "poll, or LISTEN on a direct connection (database.listen_url)")
    return p


def worker_main(ad_cls: type[Adapter]) -> None:
    wp = argparse.ArgumentParser()
    wp.add_argument("_worker")
    wp.add_argument("--dsn", required=True)
    wp.add_argument("--concurrency", type=int, required=True)
    wp.add_argument("--index", type=int, default=0)
    wp.add_argument("--max-concurrent-tasks", type=int)
    wa = wp.parse_args()
    ad_cls(argparse.Namespace(dsn=wa.dsn, max_concurrent_tasks=wa.max_concurrent_tasks)
           ).run_worker(wa.concurrency, wa.index)


def main(ad_cls: type[Adapter]) -> None:
    if sys.argv[1:2] == ["_worker"]:
        return worker_main(ad_cls)
    a = build_parser().parse_args()
    a.concurrency = a.concurrency or ad_cls.default_concurrency
    ad = ad_cls(a)
    logdir = Path(tempfile.mkdtemp(prefix=f"bench-{ad.name}-"))
    started = time.time()
    metrics = asyncio.run(ad.workloads()[a.workload](ad, a, logdir))
    out = {"peer": ad.name, "workload": a.workload, "params": vars(a) | {"dsn": None},
           "worker_model": ad.worker_model(),
           "versions": {"python": platform.python_version(), **ad.versions()},
           "started_at": started, "duration_s": time.time() - started, "metrics": metrics}
    print(f"[{ad.name}] logs in {logdir}", file=sys.stderr)
    text = json.dumps(out, indent=2, sort_keys=True)
    Path(a.out).write_text(text + "\n") if a.out else print(text)
    sys.exit(1 if metrics.get("failed") else 0)
