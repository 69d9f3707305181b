"""Celery + Redis driver (a *broker* comparison, not a Postgres queue).

Broker: Redis db 0.  "Done" = a result stored in the Redis result backend
(db 1), i.e. the task finished and Celery recorded SUCCESS.  The --dsn
argument is accepted for CLI compatibility and ignored; the Redis URL comes
from --redis or $BENCH_REDIS_URL.

Worker model: ONE `celery worker` master with a prefork pool of K child
processes (-c K), each child runs one task at a time; default prefetch
multiplier (4), default acks (early); --without-gossip --without-mingle
--without-heartbeat (standard single-node flags).  --concurrency is
ignored for this peer (the prefork children are the concurrency).
No batch enqueue API (Celery has none; group() still publishes one message
per task), so only single enqueue is measured.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import version

from celery import Celery

from peers import driver

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:56379")
QUEUE = "bench"

app = Celery("bench", broker=f"{REDIS_URL}/0", backend=f"{REDIS_URL}/1")
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop(i: int) -> None:
    return None


@app.task(name="lat")
def lat(i: int) -> None:
    driver.record_start(i)


class CeleryClient(driver.Client):
    def __init__(self) -> None:
        # one producer connection, reused for every publish
        self.conn = app.connection_for_write()
        self.conn.ensure_connection()
        self.producer = app.amqp.Producer(self.conn)

    def enqueue(self, payload: dict) -> None:
        noop.apply_async(kwargs=payload, producer=self.producer)

    def enqueue_latency(self, payload: dict) -> None:
        lat.apply_async(kwargs=payload, producer=self.producer)

    enqueue_batch = None

    def close(self) -> None:
        self.conn.release()


class CeleryAdapter(driver.Adapter):
    name = "celery-redis"
    default_concurrency = 1  # ignored
    has_batch = False

    def __init__(self, args):
        super().__init__(args)
        import redis

        self.r_broker = redis.Redis.from_url(f"{REDIS_URL}/0")
        self.r_result = redis.Redis.from_url(f"{REDIS_URL}/1")

    def versions(self) -> dict[str, str]:
        info = self.r_broker.info("server")
        return {"celery": version("celery"), "kombu": version("kombu"),
                "redis-py": version("redis"), "redis-server": info.get("redis_version", "?")}

    def worker_model(self) -> str:
        return (f"1 celery worker master + prefork pool of {self.args.workers} child processes "
                "(-c K, 1 task at a time each), prefetch_multiplier=4, early ack, Redis broker "
                "(BRPOP push), Redis result backend")

    async def reset(self) -> None:
        self.r_broker.flushdb()
        self.r_result.flushdb()

    async def clear(self) -> None:
        await self.reset()

    async def open_client(self) -> driver.Client:
        return CeleryClient()

    def before_drain(self) -> None:
        pass

    def count_done(self, total: int) -> int:
        return int(self.r_result.dbsize())

    def worker_commands(self, workers: int, concurrency: int) -> list[list[str]]:
        celery_bin = os.path.join(os.path.dirname(sys.executable), "celery")
        return [[
            celery_bin, "-A", "peers.celery_peer", "worker",
            "--pool", "prefork", "-c", str(workers), "-Q", QUEUE,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", "WARNING", "-n", "bench@%h",
        ]]


if __name__ == "__main__":
    driver.main(CeleryAdapter)
