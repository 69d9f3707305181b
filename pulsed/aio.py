"""AsyncRunner: one asyncio event loop per worker process, on its own thread.

`async def` handlers run here, up to worker.concurrency at once; the
worker's main thread submits them and waits on the concurrent futures
`run_coroutine_threadsafe` returns, the same way it waits on its thread
pool. The loop starts with the first async job, so a worker that only has
sync handlers never starts it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from typing import Any, Coroutine

log = logging.getLogger(__name__)

LOOP_STOP_WAIT_S = 5.0


class AsyncRunner:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._running_loop())

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(loop, started),
                                                name="pulse-asyncio", daemon=True)
                self._thread.start()
                started.wait()
                self._loop = loop
            return self._loop

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def close(self) -> None:
        """Stop the loop (the worker waited for its jobs first)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(LOOP_STOP_WAIT_S)
        if thread.is_alive():
            log.warning("the asyncio loop did not stop within %.0fs", LOOP_STOP_WAIT_S)
