"""Handlers the system tests' daemons import (daemon config: worker.handlers)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pulsed
from pulsed.worker import JobTimeout


def _mark(job: pulsed.Job, what: str) -> None:
    """Leave a file per event in payload['dir'], so tests can count runs."""
    folder = job.payload.get("dir")
    if folder:
        Path(folder, f"{job.id}.{job.attempt}.{os.getpid()}.{what}").touch()


@pulsed.handler("noop")
def noop(job: pulsed.Job) -> None:
    _mark(job, "done")


@pulsed.handler("metrics_inherited")
def metrics_inherited(job: pulsed.Job) -> None:
    """Marks whether this worker had prometheus_client before it ran a job."""
    import sys
    _mark(job, "inherited" if "prometheus_client" in sys.modules else "not-inherited")


@pulsed.handler("sleep")
def sleep(job: pulsed.Job) -> None:
    _mark(job, "start")
    time.sleep(job.payload.get("s", 1.0))
    _mark(job, "done")


@pulsed.handler("sleep_first")
def sleep_first(job: pulsed.Job) -> None:
    """Long on the first attempt (to be killed), quick afterwards."""
    _mark(job, "start")
    if job.attempt == 1:
        time.sleep(job.payload.get("s", 60.0))
    _mark(job, "done")


@pulsed.handler("hang")
def hang(job: pulsed.Job) -> None:
    """Ignores its soft timeout, as a handler stuck in C code would."""
    _mark(job, "start")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            time.sleep(0.5)
        except JobTimeout:
            _mark(job, "ignored-timeout")


def _timed(job: pulsed.Job) -> None:
    """Sleep payload['s'] and leave '<id>.<attempt>.<pid>.span' holding the
    wall-clock start and end, so tests can measure overlap and start rates."""
    start = time.time()
    time.sleep(job.payload.get("s", 0.0))
    end = time.time()
    folder = job.payload.get("dir")
    if folder:
        Path(folder, f"{job.id}.{job.attempt}.{os.getpid()}.span").write_text(f"{start} {end}")


for _type in ("limited", "rated", "timed"):
    pulsed.handler(_type)(_timed)


# -- handlers for the fault-injection suite (tests/chaos) --------------------------------


@pulsed.handler("work")
def work(job: pulsed.Job) -> None:
    """Steady load: sleep payload['s'] (default 0), then mark 'done'."""
    seconds = job.payload.get("s", 0.0)
    if seconds:
        time.sleep(seconds)
    _mark(job, "done")


@pulsed.handler("exit3")
def exit3(job: pulsed.Job) -> None:
    """The worker process vanishes mid-job, as os._exit in a C library would."""
    _mark(job, "start")
    os._exit(3)


@pulsed.handler("segfault")
def segfault(job: pulsed.Job) -> None:
    """A crash in native code: reading address 0 (SIGSEGV)."""
    import ctypes
    _mark(job, "start")
    ctypes.string_at(0)


class Unpicklable(Exception):
    """Holds a lock and a lambda, and refuses pickling outright."""

    def __init__(self) -> None:
        import threading
        super().__init__("cannot be pickled")
        self.lock = threading.Lock()
        self.callback = lambda: None

    def __reduce__(self):  # noqa: ANN204
        raise TypeError("Unpicklable exceptions cannot be pickled")


class Unprintable(Exception):
    """str(), repr() and even the class name's formatting blow up."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ is broken")


@pulsed.handler("raise_unpicklable")
def raise_unpicklable(job: pulsed.Job) -> None:
    _mark(job, "start")
    raise Unpicklable()


@pulsed.handler("raise_unprintable")
def raise_unprintable(job: pulsed.Job) -> None:
    _mark(job, "start")
    raise Unprintable()


@pulsed.handler("raise_nul")
def raise_nul(job: pulsed.Job) -> None:
    """A message with a NUL byte (binary data in an error): PostgreSQL text
    columns refuse NUL, so recording it naively fails."""
    _mark(job, "start")
    raise ValueError("bad frame: b'\x00\x01\x02'\x00 (binary)")


@pulsed.handler("raise_surrogate")
def raise_surrogate(job: pulsed.Job) -> None:
    """A message that cannot be encoded to UTF-8 (a lone surrogate, as
    os.fsdecode produces for undecodable file names)."""
    _mark(job, "start")
    name = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
    raise OSError(f"cannot open {name}")


@pulsed.handler("raise_huge")
def raise_huge(job: pulsed.Job) -> None:
    """A 5 MB message and a 500-frame traceback."""
    _mark(job, "start")

    def deep(n: int) -> None:
        if n:
            deep(n - 1)
        raise RuntimeError("x" * 5_000_000)
    deep(500)


@pulsed.handler("sys_exit")
def sys_exit(job: pulsed.Job) -> None:
    """A handler that calls sys.exit(3) (SystemExit, a BaseException)."""
    import sys
    _mark(job, "start")
    sys.exit(3)


@pulsed.handler("raise_keyboard_interrupt")
def raise_keyboard_interrupt(job: pulsed.Job) -> None:
    """A handler raising KeyboardInterrupt itself (no Ctrl-C reaches a child)."""
    _mark(job, "start")
    raise KeyboardInterrupt("raised by the handler")


@pulsed.handler("return_huge_int")
def return_huge_int(job: pulsed.Job) -> dict:
    """A result json.dumps writes once Python's int limit is lifted, and
    jsonb refuses (over 131,072 digits)."""
    import sys
    _mark(job, "start")
    sys.set_int_max_str_digits(0)
    return {"v": 10 ** 140_000}


# -- handlers for the execution modes (threads, asyncio) ---------------------------


def _ran_before(job: pulsed.Job) -> bool:
    folder = job.payload.get("dir")
    return bool(folder) and any(Path(folder).glob(f"{job.id}.*.start"))


@pulsed.handler("long_once")
def long_once(job: pulsed.Job) -> None:
    """Long on its first run (to be killed or interrupted), quick on later
    runs, whatever the attempt number says (an interrupted run gives its
    attempt back)."""
    first = not _ran_before(job)
    _mark(job, "start")
    if first:
        time.sleep(job.payload.get("s", 60.0))
    _mark(job, "done")


@pulsed.handler("async_long_once")
async def async_long_once(job: pulsed.Job) -> None:
    import asyncio
    first = not _ran_before(job)
    _mark(job, "start")
    if first:
        await asyncio.sleep(job.payload.get("s", 60.0))
    _mark(job, "done")


@pulsed.handler("async_hang")
async def async_hang(job: pulsed.Job) -> None:
    """Blocks its event loop (a sync call in async code): its cancellation
    at the timeout cannot happen, so the master's hard kill must."""
    _mark(job, "start")
    time.sleep(120)


@pulsed.handler("async_record")
async def async_record(job: pulsed.Job) -> None:
    """Awaits, then writes its side effect to the database on an async
    connection: proof that the coroutine really ran."""
    import asyncio
    import psycopg
    await asyncio.sleep(job.payload.get("s", 0.05))
    async with await psycopg.AsyncConnection.connect(job.payload["dsn"]) as aconn:
        await aconn.execute("INSERT INTO side_effects (job_id, attempt) VALUES (%s, %s)",
                            (job.id, job.attempt))


@pulsed.handler("async_fail_first")
async def async_fail_first(job: pulsed.Job) -> None:
    import asyncio
    await asyncio.sleep(0.01)
    if job.attempt == 1:
        raise RuntimeError("async boom")
    _mark(job, "done")


@pulsed.handler("async_fail_for_good")
async def async_fail_for_good(job: pulsed.Job) -> None:
    raise pulsed.Fail("no point retrying")


@pulsed.handler("returns_coroutine")
def returns_coroutine(job: pulsed.Job):  # noqa: ANN201 - the bug under test
    """A plain function that returns a coroutine instead of awaiting it."""
    async def work() -> None:
        _mark(job, "done")
    return work()


# -- cancelling a running job, progress -------------------------------------------


@pulsed.handler("cancellable")
def cancellable(job: pulsed.Job) -> None:
    """Stops as soon as it sees job.cancelled."""
    _mark(job, "start")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if job.cancelled:
            _mark(job, "saw-cancel")
            return
        time.sleep(0.05)


@pulsed.handler("ignores_cancel")
def ignores_cancel(job: pulsed.Job) -> None:
    _mark(job, "start")
    time.sleep(60)


@pulsed.handler("async_ignores_cancel")
async def async_ignores_cancel(job: pulsed.Job) -> None:
    import asyncio
    _mark(job, "start")
    await asyncio.sleep(60)


@pulsed.handler("reports_progress")
def reports_progress(job: pulsed.Job) -> None:
    """100,000 progress calls in a tight loop, then waits to be released."""
    for i in range(100_000):
        job.progress(i / 100_000, f"step {i}")
    job.progress(0.5, "halfway")
    _mark(job, "start")
    folder = Path(job.payload["dir"])
    deadline = time.monotonic() + 30
    while not (folder / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.progress(1.0, "done")

@pulsed.handler("say")
def say(job: pulsed.Job) -> None:
    """Prints, as handlers do: the daemon's log shows the lines with the job."""
    import sys
    print(job.payload.get("text", "hello"), flush=True)
    print("on stderr too", file=sys.stderr, flush=True)
    _mark(job, "done")


@pulsed.handler("threaded_progress")
def threaded_progress(job: pulsed.Job) -> None:
    """One of 8 jobs on 8 threads, each reporting its own progress."""
    for i in range(1, 1001):
        job.progress(i / 1000, f"job {job.id} at {i}")
    _mark(job, "start")
    folder = Path(job.payload["dir"])
    deadline = time.monotonic() + 30
    while not (folder / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


@pulsed.handler("async_cancellable")
async def async_cancellable(job: pulsed.Job) -> None:
    """A cooperative async handler: polls job.cancelled between awaits."""
    import asyncio
    _mark(job, "start")
    for _ in range(1200):
        if job.cancelled:
            _mark(job, "saw-cancel")
            return
        await asyncio.sleep(0.05)


@pulsed.handler("big_result")
def big_result(job: pulsed.Job) -> str:
    return "x" * (2 * 1024 * 1024)  # 2 MiB: over the default max_result_bytes

@pulsed.handler("fork")
def fork(job: pulsed.Job) -> None:
    """Fork, as a careless handler would, and return in the parent. The
    child (payload 'child'): "exit" raises SystemExit, "return" returns,
    "sleep" stays alive; each leaves '<id>.<attempt>.<pid>.forked'."""
    child = os.fork()
    if child == 0:
        _mark(job, "forked")
        how = job.payload.get("child", "exit")
        if how == "exit":
            raise SystemExit(0)
        if how == "sleep":
            time.sleep(300)
        return
    _mark(job, "done")


@pulsed.handler("grow")
def grow(job: pulsed.Job) -> None:
    """Grow to payload['mb'] MiB, 10 MiB every 50 ms, hold it a second."""
    _mark(job, "start")
    chunks = []
    for _ in range(job.payload.get("mb", 100) // 10):
        chunks.append(b"x" * (10 * 2**20))  # written, so resident
        time.sleep(0.05)
    time.sleep(1.0)
    _mark(job, "done")


@pulsed.handler("say_log")
def say_log(job: pulsed.Job) -> None:
    """Log payload['text'] (a line on the worker's stderr)."""
    logging.getLogger("tests.say").warning("say: %s", job.payload["text"])


@pulsed.handler("boom")
def boom(job: pulsed.Job) -> None:
    raise RuntimeError("boom")


def _hog_until_memory_error(job: pulsed.Job) -> None:
    """On attempt 1, allocate 8 MiB chunks until MemoryError (the test caps
    the worker's RLIMIT_AS), which propagates; later attempts are quick."""
    _mark(job, "start")
    if job.attempt == 1:
        chunks = []
        while True:
            chunks.append(bytearray(8 * 2**20))
    _mark(job, "done")


@pulsed.handler("hog")
def hog(job: pulsed.Job) -> None:
    _hog_until_memory_error(job)


@pulsed.handler("async_hog")
async def async_hog(job: pulsed.Job) -> None:
    _hog_until_memory_error(job)
