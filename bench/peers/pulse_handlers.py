"""The benchmark's job handlers for Pulse (daemon config: worker.handlers)."""

from __future__ import annotations

import asyncio
import time

import pulsed
from peers.driver import record_start


@pulsed.handler("noop")
def noop(job: pulsed.Job) -> None:
    return None


@pulsed.handler("lat")
def lat(job: pulsed.Job) -> None:
    record_start(job.payload["i"])


@pulsed.handler("mixed")
def mixed(job: pulsed.Job) -> None:
    """W5: record the start, then 'work' for payload['ms'] milliseconds."""
    record_start(job.payload["i"])
    time.sleep(job.payload["ms"] / 1000.0)


@pulsed.handler("io_async")
async def io_async(job: pulsed.Job) -> None:
    """W6: wait payload['ms'] milliseconds on the event loop (an I/O call)."""
    await asyncio.sleep(job.payload["ms"] / 1000.0)


@pulsed.handler("io_sync")
def io_sync(job: pulsed.Job) -> None:
    """W6: the same wait, blocking its thread (a blocking I/O library)."""
    time.sleep(job.payload["ms"] / 1000.0)


@pulsed.handler("startup")
def startup(job: pulsed.Job) -> None:
    """bench/startup.py: when the first job's handler began (wall clock)."""
    started = time.time()
    with open(job.payload["file"], "w") as fh:
        fh.write(repr(started))
