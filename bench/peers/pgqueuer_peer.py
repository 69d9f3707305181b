"""PgQueuer driver (psycopg 3 async driver, default durable schema).
See pgqueuer_asyncpg_peer.py for the same peer on pgqueuer's asyncpg driver.

Worker model: K separate `_worker` processes, each running
`pgqueuer.run(factory, batch_size=C)` -- what `pgq run` does: one asyncio loop
per process, dequeues up to C jobs per query (SKIP LOCKED), dispatches each as
an asyncio task, no per-process cap on in-flight jobs (pgqueuer's default),
LISTEN/NOTIFY wake-up; completions are buffered and written in batches (one
statement moves finished jobs from the queue table to pgqueuer_log).
W6 (--workload io): --max-concurrent-tasks M passes run(max_concurrent_tasks=M),
PgQueuer's cap on the jobs one process has picked (enforced by its dequeue
query; it must be at least twice batch_size).
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from importlib.metadata import version

import psycopg
from pgqueuer import PgQueuer, Queries
from pgqueuer.db import AsyncpgDriver, PsycopgDriver

from peers import driver


async def connect(dsn: str, lib: str = "psycopg"):
    """Return (connection, pgqueuer Driver) for the chosen client library."""
    if lib == "asyncpg":
        import asyncpg

        conn = await asyncpg.connect(dsn)
        return conn, AsyncpgDriver(conn)
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    return conn, PsycopgDriver(conn)


class PgqClient(driver.Client):
    """PgQueuer's enqueue is one autocommit statement; with in_transaction,
    each call runs inside an application transaction (BEGIN … COMMIT), the
    shape of Pulse's default client, so the two compare like for like."""

    def __init__(self, conn, drv, in_transaction: bool = False):
        self.conn = conn
        self.q = Queries(drv)
        self.in_transaction = in_transaction

    async def _enqueue(self, *args) -> None:
        if not self.in_transaction:
            await self.q.enqueue(*args)
            return
        async with self.conn.transaction():  # asyncpg and psycopg alike
            await self.q.enqueue(*args)

    async def enqueue(self, payload: dict) -> None:
        await self._enqueue("noop", json.dumps(payload).encode())

    async def enqueue_latency(self, payload: dict) -> None:
        await self._enqueue("lat", json.dumps(payload).encode())

    async def enqueue_batch(self, payloads: list[dict]) -> None:
        n = len(payloads)
        await self._enqueue(["noop"] * n, [json.dumps(p).encode() for p in payloads], [0] * n)

    async def enqueue_io_batch(self, payloads: list[dict]) -> None:
        n = len(payloads)
        await self._enqueue(["io"] * n, [json.dumps(p).encode() for p in payloads], [0] * n)

    async def close(self) -> None:
        await self.conn.close()


def make_factory(dsn: str, lib: str):
    @asynccontextmanager
    async def factory():
        conn, drv = await connect(dsn, lib)
        pgq = PgQueuer(drv)

        @pgq.entrypoint("noop")
        async def noop(job) -> None:
            return None

        @pgq.entrypoint("lat")
        async def lat(job) -> None:
            driver.record_start(json.loads(job.payload)["i"])

        @pgq.entrypoint("io")
        async def io(job) -> None:  # W6: an awaited I/O call of payload["ms"]
            await asyncio.sleep(json.loads(job.payload)["ms"] / 1000.0)

        try:
            yield pgq
        finally:
            await conn.close()

    return factory


class PgqueuerAdapter(driver.PgMonitor, driver.Adapter):
    name = "pgqueuer"
    lib = "psycopg"
    default_concurrency = 10  # = pgqueuer's default batch_size

    def versions(self) -> dict[str, str]:
        return {"pgqueuer": version("pgqueuer"), self.lib: version(self.lib)}

    def worker_model(self) -> str:
        cap = getattr(self.args, "max_concurrent_tasks", None)
        cap_text = (f"at most max_concurrent_tasks={cap} picked per process" if cap
                    else "no max_concurrent_tasks cap")
        return (f"{self.args.workers} x `pgq run` equivalent (pgqueuer.run) processes, "
                f"batch_size={self.args.concurrency} (dequeue up to that many per query, "
                f"each job an asyncio task, {cap_text}), {self.lib} driver, "
                "LISTEN/NOTIFY, completions buffered (flush at batch_size or 0.1 s)")

    def io_slots(self) -> int:
        cap = self.args.max_concurrent_tasks
        return self.args.workers * cap if cap else 0  # 0: no cap, no limit to compare with

    def worker_extra_args(self) -> list[str]:
        cap = self.args.max_concurrent_tasks
        return ["--max-concurrent-tasks", str(cap)] if cap else []

    async def reset(self) -> None:
        driver.wipe_public_schema(self.args.dsn)
        conn, drv = await connect(self.args.dsn, self.lib)
        try:
            await Queries(drv).install()
        finally:
            await conn.close()

    async def clear(self) -> None:
        conn, _ = await connect(self.args.dsn, self.lib)
        try:
            await conn.execute("TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics")
        finally:
            await conn.close()

    async def open_client(self) -> driver.Client:
        return PgqClient(*await connect(self.args.dsn, self.lib),
                         in_transaction=self.args.enqueue_in_transaction)

    def count_done(self, total: int) -> int:
        # finished jobs are deleted from the queue table (and logged) in one statement
        return total - self.scalar("select count(*) from pgqueuer")

    def run_worker(self, concurrency: int, index: int) -> None:
        import pgqueuer

        asyncio.run(pgqueuer.run(make_factory(self.args.dsn, self.lib), batch_size=concurrency,
                                 max_concurrent_tasks=self.args.max_concurrent_tasks))


if __name__ == "__main__":
    driver.main(PgqueuerAdapter)
