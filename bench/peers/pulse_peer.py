"""Pulse, from this repository: the real `pulsed` daemon with its defaults.

Worker model: one `pulsed --config pulse.toml` master forking K workers and
a scheduler, every [worker] setting at its default except `concurrency`
(--concurrency, default 1): claims sized to the work a worker can start soon
(adaptive prefetch), jobs run one after another, completions written with
the next claim; LISTEN/NOTIFY wake-up, 1 s poll fallback; log level info.
Enqueue is the public API: pulsed.enqueue / pulsed.enqueue_many, each call
in its own transaction. --pgbouncer: the daemon and the enqueuing clients
go through a private PgBouncer in transaction mode (tests/pgbouncer.py)
with database.pooler = "transaction"; `poll` gives the workers no direct
connection (they poll at the 1 s poll_interval), `listen` gives them the
database itself as database.listen_url. W6 (--workload io) drains `io_async` jobs (an
`async def` handler, awaited on the worker's event loop) or `io_sync` ones
(a plain `def`, on the worker's threads): --io-handler.
"""

from __future__ import annotations

import atexit
import hashlib
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import psycopg
import tomli_w

import pulsed
from pulsed.db.migrate import migrate
from peers import driver

HANDLERS = "peers.pulse_handlers"
SCAN_COUNT = "SELECT count(*) FROM pulse_jobs WHERE state = 'completed'"


def code_hash() -> str:
    """A hash of the pulsed package this driver imported (bench/harness.py
    runs a snapshot of it; the results say which commit it came from)."""
    digest = hashlib.sha1()
    for path in sorted(Path(pulsed.__file__).parent.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".sql"):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:8]


def reset(dsn: str) -> None:
    """Migrate (a no-op when current), then empty every Pulse table."""
    with psycopg.connect(dsn, autocommit=True) as c:
        migrate(c)
        tables = [r[0] for r in c.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
            "AND tablename LIKE 'pulse\\_%' AND tablename <> 'pulse_migrations'")]
        c.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")


class PulseClient(driver.Client):
    """Each enqueue is its own transaction: BEGIN + INSERT, then COMMIT,
    as an application enqueuing inside its own transaction does; with
    autocommit, the INSERT alone (the shape of PgQueuer's enqueue)."""

    def __init__(self, dsn: str, autocommit: bool = False, io_type: str = "io_async",
                 pooled: bool = False):
        # Behind a transaction pooler no prepared statement outlives a transaction.
        self.conn = psycopg.connect(dsn, autocommit=autocommit,
                                    **({"prepare_threshold": None} if pooled else {}))
        self.io_type = io_type

    def enqueue(self, payload: dict) -> None:
        pulsed.enqueue(self.conn, "noop", payload)
        self.conn.commit()  # a no-op with autocommit

    def enqueue_latency(self, payload: dict) -> None:
        pulsed.enqueue(self.conn, "lat", payload)
        self.conn.commit()

    def enqueue_mixed(self, payload: dict) -> None:
        pulsed.enqueue(self.conn, "mixed", payload)
        self.conn.commit()

    def enqueue_batch(self, payloads: list[dict]) -> None:
        pulsed.enqueue_many(self.conn, [{"type": "noop", "payload": p} for p in payloads])
        self.conn.commit()

    def enqueue_io_batch(self, payloads: list[dict]) -> None:
        pulsed.enqueue_many(self.conn, [{"type": self.io_type, "payload": p} for p in payloads])
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()


class CompletedCounter:
    """The exact number of completed jobs, read without scanning the table.

    `count(*) FROM pulse_jobs WHERE state = 'completed'` reads every row of
    the wide table, finished or not: 20-30 ms of a backend at 100,000 jobs,
    ten times a second beside the drain it measures (the probe's count reads
    its narrow history table, which holds only finished rows).

    Instead each completed row is read once, through the finished-jobs
    index (finished_at is the completing transaction's start). Rows
    finished before every open transaction began (less a margin for one
    begun but not yet shown in pg_stat_activity) can no longer appear, so
    their count is kept; later rows are read again at the next poll.
    Autovacuum's transactions are left out: they finish no job, and one on
    pulse_jobs can last most of a drain. The monitor must see the other
    sessions' transactions (the daemon's role, or pg_read_all_stats); if
    it cannot, rows may be settled too early and the drain never seen to
    end (the run then times out, it is not mismeasured). The
    `pulse-scancount` config polls the scan instead, to compare the two."""

    MARGIN = "100 milliseconds"

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        self.settled_before = None  # finished_at bound below which counted rows are final
        self.settled = 0

    def count(self) -> int:
        # First the horizon, then (a later snapshot) the rows: a transaction
        # committed in between is visible to the count.
        horizon = self.conn.execute(
            "SELECT coalesce(min(xact_start), now()) - %s::interval FROM pg_stat_activity "
            "WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend' AND datname = current_database()",
            (self.MARGIN,)).fetchone()[0]
        settling, seen = self.conn.execute(
            "SELECT count(*) FILTER (WHERE finished_at < %s), count(*) FROM pulse_jobs "
            "WHERE state = 'completed' AND finished_at >= coalesce(%s::timestamptz, '-infinity')",
            (horizon, self.settled_before)).fetchone()
        done = self.settled + seen
        if self.settled_before is None or horizon > self.settled_before:
            self.settled += settling
            self.settled_before = horizon
        return done


class PulseAdapter(driver.PgMonitor, driver.Adapter):
    name = "pulse"
    default_concurrency = 1  # worker.concurrency's default
    _bouncer = None
    _counter = None

    def pooled_dsn(self) -> str:
        """The address applications and the daemon use: the database, or
        with --pgbouncer a private PgBouncer in front of it (started once)."""
        if not getattr(self.args, "pgbouncer", None):
            return self.args.dsn
        if self._bouncer is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
            from tests.pgbouncer import PgBouncer
            self._bouncer = PgBouncer(self.args.dsn, max_client_conn=50, pool_size=10).start()
            atexit.register(self._bouncer.stop)
        return self._bouncer.dsn

    def versions(self) -> dict[str, str]:
        return {"pulse": f"{pulsed.__version__} (code {code_hash()})", "psycopg": version("psycopg"),
                "pulsed_from": str(Path(pulsed.__file__).parent)}

    def worker_model(self) -> str:
        handler = ""
        if self.args.workload == "io":
            handler = ("; handler `async def` (await asyncio.sleep) on the worker's event loop"
                       if self.args.io_handler == "async" else
                       "; handler plain `def` (time.sleep) on the worker's threads")
        return (f"pulsed master + scheduler + {self.args.workers} workers, [worker] defaults "
                f"(adaptive prefetch, completions sent with the next claim) but "
                f"concurrency={self.args.concurrency}; LISTEN/NOTIFY + 1 s poll; log level info"
                + handler + self._pooler_model())

    def _pooler_model(self) -> str:
        mode = getattr(self.args, "pgbouncer", None)
        if not mode:
            return ""
        return ("; through PgBouncer (transaction mode), workers "
                + ("polling at 1 s" if mode == "poll" else "LISTENing on a direct listen_url"))

    def workloads(self) -> dict[str, Callable]:
        from peers import pulse_load
        return super().workloads() | {"backlog": pulse_load.run_backlog, "mixed": pulse_load.run_mixed}

    async def reset(self) -> None:
        reset(self.args.dsn)

    async def clear(self) -> None:
        with psycopg.connect(self.args.dsn, autocommit=True) as c:
            c.execute("TRUNCATE pulse_jobs RESTART IDENTITY CASCADE")

    async def open_client(self) -> driver.Client:
        return PulseClient(self.pooled_dsn(), autocommit=self.args.enqueue_autocommit,
                           io_type=f"io_{self.args.io_handler}",
                           pooled=bool(getattr(self.args, "pgbouncer", None)))

    def count_done(self, total: int) -> int:
        if getattr(self.args, "done_count", "incremental") == "scan":
            return self.scalar(SCAN_COUNT)
        if self._counter is None:
            self.scalar("SELECT 1")  # opens the monitor's connection
            self._counter = CompletedCounter(self._mon)
        done = self._counter.count()
        if done >= total:  # the drain ends here: check against a full count once
            # (taken later, it can only see more: fewer is a row counted twice)
            full = self.scalar(SCAN_COUNT)
            if full < done:
                raise RuntimeError(f"the incremental count said {done} jobs completed, "
                                   f"a full count {full}")
        return done

    def worker_commands(self, workers: int, concurrency: int) -> list[list[str]]:
        state = Path(tempfile.mkdtemp(prefix="bench-pulsed-"))
        database = {"url": self.pooled_dsn()}
        if getattr(self.args, "pgbouncer", None):
            database["pooler"] = "transaction"
            if self.args.pgbouncer == "listen":
                database["listen_url"] = self.args.dsn
        config = {
            "database": database,
            "daemon": {"state_dir": str(state), "workers": workers, "node_id": "bench",
                       "stop_timeout": 5},
            "worker": {"handlers": [HANDLERS], "concurrency": concurrency},
            "api": {"enabled": False},  # on by default; not measured, and port 8080 may be taken
        }
        (state / "pulse.toml").write_text(tomli_w.dumps(config))
        return [[sys.executable, "-m", "pulsed", "--config", str(state / "pulse.toml")]]


if __name__ == "__main__":
    driver.main(PulseAdapter)
