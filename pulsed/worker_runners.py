"""Running one claimed job: its handler on this thread (a soft timeout by
SIGALRM), or awaited on the worker's event loop; its outcome recorded in
the ledger (a failure written at once, a completion with the next claim)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import os
import signal
import threading
import time
import traceback as traceback_module
from concurrent.futures import CancelledError

from pulsed.api import Fail, Handler, Snooze
from pulsed.errors import JobInputError
from pulsed.job_input import MAX_JSON_DEPTH, _check_seconds, nested_deeper_than
from pulsed.jobs import Job, JobState, Outcome
from pulsed.metrics import JobReport
from pulsed.worker_options import (COMPLETED, EWMA_WEIGHT, FORKED_CHILD_FAILED,
                                   MAX_TRACEBACK_CHARS, JobTimeout)

# The worker's records go to one logger, whichever module writes them
# (operators and tests filter on "pulsed.worker").
log = logging.getLogger("pulsed.worker")

# How many times this process was born of a fork (os.fork, multiprocessing,
# pty.fork: Python runs its at-fork hooks in each child). While it has not
# changed since the worker was made, the worker is still the same process,
# known without os.getpid(): a system call per job, ~3% of a drain's CPU.
_forks = [0]


def forks_so_far() -> int:
    return _forks[0]


def _count_fork() -> None:
    _forks[0] += 1


os.register_at_fork(after_in_child=_count_fork)


class JobRunners:
    """Mixin of Worker: run a job and conclude it."""

    def _handler(self, job: Job) -> Handler | None:
        return self._type_info(job.type)[0]

    def _type_info(self, job_type: str) -> tuple[Handler | None, float | None]:
        """A type's handler and default timeout, looked up once per type
        (the registry and the config do not change while a worker runs)."""
        info = self._types.get(job_type)
        if info is None:
            handler = self.registry.get(job_type) if job_type in self.registry else None
            timeout = (handler.timeout if handler is not None and handler.timeout
                       else self.options.type_timeouts.get(job_type))
            info = (handler, timeout)
            if handler is not None:  # an unknown type may be registered later
                self._types[job_type] = info
        return info

    def _timeout_for(self, job: Job) -> float | None:
        return job.timeout or self._type_info(job.type)[1]

    def run_job(self, job: Job, *, soft_timeout: bool = True) -> bool:
        """Run one claimed job on this thread (an async handler: on the
        event loop, waited for here). True when it completed (its
        completion is written with the next batch); failures are written
        here. False too when the job was given back before it started."""
        handler, type_timeout = self._type_info(job.type)
        timeout = job.timeout or type_timeout
        if not self.ledger.start(job, timeout):
            return False  # the keeper gave it back while an earlier job ran long
        if handler is not None and handler.is_async:
            try:
                return self._submit_async(job, handler, timeout).result()
            except CancelledError:
                return False  # cancelled past its grace: the ledger let it go
        return self._run_started(job, handler, timeout if soft_timeout else None)

    def _run_started(self, job: Job, handler: Handler | None, soft_timeout: float | None
                     ) -> bool:
        """A started job's sync handler, on this thread, under its soft
        timeout (main thread only: SIGALRM)."""
        started = time.monotonic()
        error: BaseException | None = None
        result: str | None = None
        try:
            if handler is None:
                self.registry.get(job.type)  # raises HandlerNotFound, recorded below
            if soft_timeout:
                with _alarm(soft_timeout):
                    value = handler.func(job)  # type: ignore[union-attr]
            else:  # no timer to arm: the handler alone (the no-op job's path is ~10 us)
                value = handler.func(job)  # type: ignore[union-attr]
            if value is not None:
                _check_not_awaitable(job, value)
                result = self._result_json(value)
        except KeyboardInterrupt as exc:
            if not _ctrl_c_may_raise():  # the handler's own: a failure like any other
                error = exc
            else:  # Ctrl-C at a worker run in the foreground: stop, as asked
                self._leave_if_forked()
                self.ledger.finish(job, completed=False)  # its lease expires; the reaper frees it
                raise
        except BaseException as exc:  # noqa: BLE001 - every failure is recorded,
            # SystemExit too: a handler calling sys.exit() fails its job, not the worker
            error = exc
            if isinstance(exc, MemoryError):
                _release_locals(exc)
        if _forks[0] != self._forks_seen:  # a fork since: maybe its child (_leave_if_forked)
            self._leave_if_forked(error)
        return self._conclude(job, error, started, result)

    async def _run_async(self, job: Job, handler: Handler, timeout: float | None) -> bool:
        """An async handler's job, on the event loop: awaited under its
        timeout (the task is cancelled then; the master's hard kill follows
        if it does not end). Failures are written from a thread, never by
        blocking the loop."""
        started = time.monotonic()
        error, value = await _await_handler(job, handler, timeout)
        self._leave_if_forked(error)
        if error is None:
            try:
                result = self._result_json(value)
            except BaseException as exc:  # noqa: BLE001 - as the sync path: a value
                # whose encoding raised (SystemExit too) fails the attempt; out of
                # the task, it hung the job or ended the event loop
                error = exc
            else:  # no I/O: the batch writes it
                return self._conclude(job, None, started, result)
        if isinstance(error, MemoryError):
            _release_locals(error)
        loop = asyncio.get_running_loop()
        try:
            writing = loop.run_in_executor(None, self._conclude, job, error, started)
        except RuntimeError:  # "can't start new thread": out of memory, or a process
            # limit. Written here, the loop waits on it; out of the task, the job
            # stayed running, its lease renewed, for as long as the worker lived.
            return self._conclude(job, error, started)
        return await writing

    def _result_json(self, value: object) -> str | None:
        """A handler's return value as the JSON text its completion
        carries; ResultNotStorable (the attempt fails, saying why) when
        PostgreSQL's jsonb cannot hold it or it is over max_result_bytes."""
        if value is None:
            return None
        return encode_result(value, self.options.max_result_bytes)

    def _leave_if_forked(self, error: BaseException | None = None) -> None:
        """A handler that forks returns twice: in this worker and in its
        child. The child holds a copy of the worker's connection, leases
        and ledger, so it must run no Pulse code: it leaves at once, with
        the status a SystemExit asked for (1 for another error, 0 when the
        handler returned)."""
        if _forks[0] == self._forks_seen or os.getpid() == self._pid:
            return
        code = 0 if error is None else FORKED_CHILD_FAILED
        if isinstance(error, SystemExit):
            code = error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
        os._exit(code)

    def _conclude(self, job: Job, error: BaseException | None, started: float,
                  result: str | None = None) -> bool:
        """Record how the attempt ended; True when it completed."""
        outcome, state = COMPLETED, None
        if job.cancelled:  # the row is `cancelled` already and the lease gone: write nothing
            self.ledger.finish(job, completed=False)
            log.info("job %s#%d: its handler ended after the job was cancelled", job.type, job.id)
            return False
        seconds = None
        try:
            if isinstance(error, Snooze):
                seconds = _snooze_seconds(error)
        except BaseException as exc:  # noqa: BLE001 - a Snooze it cannot read: the
            error = exc  # attempt fails, saying why (out of here, the job stayed held)
        try:
            if seconds is not None:
                outcome = Outcome.SNOOZED.value
                with self.db() as store:
                    state = store.snooze(job, seconds)
            elif error is not None:
                outcome, state = self._record_failure(job, error)
        finally:
            # Even if recording failed: the job leaves the ledger, its lease
            # expires and the reaper records it. Never as completed when the
            # handler raised: a failure whose write raised was stored so.
            self.ledger.finish(job, completed=error is None, result=result)
        elapsed = time.monotonic() - started
        failure = _safe_str(error) if error is not None and outcome != Outcome.SNOOZED.value \
            else None
        self._report(JobReport(job, outcome, elapsed, state, time.time(), failure))
        self._avg_duration = elapsed if self._avg_duration is None else (
            self._avg_duration * (1 - EWMA_WEIGHT) + elapsed * EWMA_WEIGHT)
        return outcome == COMPLETED

    def _record_failure(self, job: Job, exc: BaseException) -> tuple[str, JobState | None]:
        timed_out = isinstance(exc, JobTimeout)
        outcome = Outcome.TIMEOUT.value if timed_out else Outcome.ERROR.value
        with self.db() as store:
            state = store.record_error(
                job, retry=not isinstance(exc, Fail), backoff=self.options.backoff(job.attempt),
                outcome=outcome, error_class=_class_name(exc), message=_safe_str(exc),
                traceback=_safe_traceback(exc), poison_after=self.options.poison_after)
        if state is None:
            log.warning("job %s#%d: lease lost before its failure was recorded", job.type, job.id)
        elif state is JobState.FAILED:
            log.error("job %s#%d failed for good: %s", job.type, job.id, _safe_str(exc))
        return outcome, state


def _check_not_awaitable(job: Job, result: object) -> None:
    """A plain function that returns an awaitable never ran its work:
    fail the attempt instead of recording a completion."""
    if result is not None and inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if callable(close):
            close()  # no "never awaited" warning: the error below says it
        raise TypeError(f"the handler of {job.type!r} returned {type(result).__name__} "
                        "without awaiting it; declare it `async def` so Pulse awaits it")


async def _await_handler(job: Job, handler: Handler, timeout: float | None
                         ) -> tuple[BaseException | None, object]:
    """Await an async handler under its timeout: (the exception it ended
    with, JobTimeout when the timeout cancelled it, or None; its value)."""
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            return None, await handler.func(job)
    except TimeoutError as exc:
        return (JobTimeout("job ran past its timeout") if deadline.expired() else exc), None
    except BaseException as exc:  # noqa: BLE001 - recorded like a sync handler's
        return exc, None


def _release_locals(error: BaseException) -> None:
    """Free what the failed handler's frames still hold (the traceback keeps
    them, and their locals, until the attempt is recorded): after a
    MemoryError that is what the recording itself needs, a thread to write
    from, or the memory to format the traceback in. Its lines stay."""
    traceback_module.clear_frames(error.__traceback__)


class ResultNotStorable(ValueError):
    """The handler's return value cannot be stored as the job's result."""


def _ctrl_c_may_raise() -> bool:
    """Whether a KeyboardInterrupt here may be the user's Ctrl-C: on the main
    thread under Python's own SIGINT handler (a Worker run from a script).
    A daemon's children ignore SIGINT and handler threads never get it, so
    there it is the handler's own raise: re-raised, it ended the worker
    process, and the master gave the job back unstarted, again and again."""
    return (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)


# jsonb's numbers are numerics: at most 131,072 digits before the point
JSONB_MAX_DIGITS = 131_072


def encode_result(value: object, max_bytes: int) -> str:
    """JSON text for jsonb: no NaN/Infinity, no NUL (jsonb refuses
    \\u0000), no lone surrogates, at most max_bytes of UTF-8."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as exc:
        raise ResultNotStorable(f"the handler's return value cannot be stored as the job's "
                                f"result ({type(exc).__name__}: {exc}); return JSON data "
                                "(dict, list, str, number, bool) or None") from None
    if nested_deeper_than(MAX_JSON_DEPTH, value, text):
        raise ResultNotStorable(f"the handler's return value nests more than {MAX_JSON_DEPTH} "
                                "arrays and objects deep; flatten it")
    if "\\u0000" in text or "\x00" in text:
        raise ResultNotStorable("the handler's return value contains a NUL character, which "
                                "PostgreSQL's jsonb cannot store as the job's result; strip it "
                                "or encode the data")
    if size > max_bytes:
        raise ResultNotStorable(f"the handler's return value is {size:,} bytes as JSON, over "
                                f"worker.max_result_bytes ({max_bytes:,}); store large data "
                                "elsewhere and return a reference to it")
    if size > JSONB_MAX_DIGITS and _has_integer_beyond_jsonb(value):
        # json.dumps wrote it (sys.set_int_max_str_digits lifted Python's
        # limit); jsonb refused it in the batch's write, which failed as a
        # whole: the worker exited, and the batch's other jobs ran again
        raise ResultNotStorable(f"the handler's return value holds an integer of more than "
                                f"{JSONB_MAX_DIGITS:,} digits, which PostgreSQL's jsonb cannot "
                                "store; return it as a string")
    return text


@functools.cache
def _jsonb_integer_limit() -> int:
    return 10 ** JSONB_MAX_DIGITS  # ~10 ms to compute: once, when first needed


def _has_integer_beyond_jsonb(value: object) -> bool:
    """Walked only for a result over JSONB_MAX_DIGITS bytes of JSON, which
    json.dumps has just walked too."""
    limit = _jsonb_integer_limit()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, int) and not -limit < item < limit:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


class _alarm:
    """Raise JobTimeout in the main thread once `seconds` pass (a soft
    limit, as Celery's; the master's kill is the hard one). Armed only
    around the handler, never around Pulse's own database writes."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.active = bool(seconds) and threading.current_thread() is threading.main_thread()

    def __enter__(self) -> None:
        if self.active:
            self._previous = signal.signal(signal.SIGALRM, _raise_timeout)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)


def _raise_timeout(signum: int, frame: object) -> None:
    raise JobTimeout("job ran past its timeout")


def _storable(text: str) -> str:
    """Text PostgreSQL accepts: NULs and lone surrogates escaped."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


MAX_CLASS_NAME = 1_000  # an exception class's name, stored with each failed attempt


def _class_name(exc: BaseException) -> str:
    """The exception's class name as stored: a handler's class may be
    named anything (a NUL made the failure's write raise)."""
    try:  # str.__str__: a str subclass's own __str__ could raise
        return _storable(str.__str__(type(exc).__qualname__))[:MAX_CLASS_NAME]
    except BaseException:  # noqa: BLE001 - as _safe_str
        return "<unnamed exception class>"


def _safe_str(exc: BaseException) -> str:
    """str(exc), even for exceptions whose __str__ raises (SystemExit and
    KeyboardInterrupt too: the outcome must not be lost to them)."""
    try:
        return _storable(f"{_class_name(exc)}: {exc}"[:4000])
    except BaseException:  # noqa: BLE001 - a broken __str__ must not lose the outcome
        return f"{_class_name(exc)}: <unprintable exception>"


def _snooze_seconds(snooze: Snooze) -> float:
    """A Snooze's delay, checked again: a subclass may set or skip
    `seconds` (NaN or 1e300 made the write raise: the worker died and its
    job, given back unstarted, crashed it again). JobInputError otherwise,
    recorded as the attempt's error."""
    seconds = vars(snooze).get("seconds")  # no property of a subclass's runs
    if type(seconds) is not float:
        raise JobInputError("seconds", f"Snooze.seconds must be a float, got "
                                       f"{type(seconds).__name__}") from snooze
    try:
        _check_seconds("seconds", seconds, allow_zero=True)
    except JobInputError as exc:
        raise exc from snooze  # the stored traceback shows where the handler raised it
    return seconds


def _safe_traceback(exc: BaseException) -> str:
    try:
        text = "".join(traceback_module.format_exception(exc))
    except BaseException:  # noqa: BLE001 - as _safe_str
        text = f"<traceback unavailable for {_class_name(exc)}>"
    return _storable(text[-MAX_TRACEBACK_CHARS:])

