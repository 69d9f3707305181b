"""Procrastinate driver.

Worker model: K separate `_worker` processes, each `App.run_worker_async(
concurrency=C)`: one asyncio event loop per process, C concurrent job slots
(async tasks run on the loop), LISTEN/NOTIFY wake-up with the default 5 s
polling fallback; jobs are fetched one at a time (procrastinate_fetch_job)
and finished one at a time (procrastinate_finish_job); finished jobs are kept
(status 'succeeded').
"""

from __future__ import annotations

import asyncio
from importlib.metadata import version

import procrastinate

from peers import driver

QUEUE = "bench"


def make_app(dsn: str, **pool_args) -> procrastinate.App:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn, **pool_args))

    @app.task(name="noop", queue=QUEUE)
    async def noop(i: int) -> None:
        return None

    @app.task(name="lat", queue=QUEUE)
    async def lat(i: int) -> None:
        driver.record_start(i)

    return app


class ProcrastinateClient(driver.Client):
    def __init__(self, app: procrastinate.App):
        self.app = app
        self.noop = app.tasks["noop"]
        self.lat = app.tasks["lat"]

    async def enqueue(self, payload: dict) -> None:
        await self.noop.defer_async(**payload)

    async def enqueue_latency(self, payload: dict) -> None:
        await self.lat.defer_async(**payload)

    async def enqueue_batch(self, payloads: list[dict]) -> None:
        await self.noop.batch_defer_async(*payloads)

    async def close(self) -> None:
        await self.app.close_async()


class ProcrastinateAdapter(driver.PgMonitor, driver.Adapter):
    name = "procrastinate"
    default_concurrency = 1  # procrastinate's own default (WORKER_CONCURRENCY)

    def versions(self) -> dict[str, str]:
        return {"procrastinate": version("procrastinate"), "psycopg": version("psycopg"),
                "psycopg-pool": version("psycopg-pool")}

    def worker_model(self) -> str:
        return (f"{self.args.workers} x `procrastinate worker` equivalent (App.run_worker_async) "
                f"processes, concurrency={self.args.concurrency} async slots each, "
                "LISTEN/NOTIFY + 5 s poll fallback, fetch 1 job/query")

    async def reset(self) -> None:
        driver.wipe_public_schema(self.args.dsn)
        app = make_app(self.args.dsn)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    async def clear(self) -> None:
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.args.dsn, autocommit=True) as c:
            await c.execute("TRUNCATE procrastinate_jobs, procrastinate_events CASCADE")

    async def open_client(self) -> driver.Client:
        # exactly one connection for the producer (procrastinate's own pool, size 1)
        app = make_app(self.args.dsn, min_size=1, max_size=1)
        await app.open_async()
        return ProcrastinateClient(app)

    def count_done(self, total: int) -> int:
        return self.scalar("select count(*) from procrastinate_jobs where status = 'succeeded'")

    def run_worker(self, concurrency: int, index: int) -> None:
        app = make_app(self.args.dsn)

        async def go() -> None:
            async with app.open_async():
                await app.run_worker_async(
                    queues=[QUEUE], concurrency=concurrency, name=f"bench-{index}",
                )

        asyncio.run(go())


if __name__ == "__main__":
    driver.main(ProcrastinateAdapter)
