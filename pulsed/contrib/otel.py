"""OpenTelemetry for Pulse (the optional extra pulse-queue[otel]).

Enqueue: a job records the W3C trace context (traceparent, tracestate)
current where it was enqueued, in its trace_context column (migration
0013), when OpenTelemetry is installed and the enqueuer is inside a span
(its application traces). Otherwise nothing is recorded, at the cost of
one context lookup.

Worker ([otel] enabled = true): each attempt runs inside a CONSUMER span,
a child of the enqueuer's context (one trace from the request that
enqueued to the job's end), named and described per OpenTelemetry's
messaging semantic conventions, with the job's id, type, attempt and the
attempt's outcome. Spans go to the global TracerProvider, which the
application sets up (an SDK and an exporter) in a module listed in
worker.handlers; without one the API's no-op provider drops them. What a
handler traces itself (HTTP calls, queries) nests under the attempt's span.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import psycopg

from pulsed.db.connect import connect
from pulsed.db.store import Statement, queries, run_steps
from pulsed.jobs import Job

if TYPE_CHECKING:
    from pulsed.api import Handler, HandlerRegistry
    from pulsed.config import Config

log = logging.getLogger(__name__)

MESSAGING_SYSTEM = "pulse"
TRACER_NAME = "pulsed"
# A job waits this long at most for its trace context's connection (the
# database unreachable: the span then starts a trace of its own).
CONNECT_TIMEOUT_S = 3


@functools.cache
def _api() -> tuple[Any, Any] | None:
    """(opentelemetry.trace, a W3C Trace Context propagator), or None when
    OpenTelemetry is not installed. Imported on first use, not with pulsed.
    W3C always, whatever the application's global propagator: the stored
    form is Pulse's, read by workers whose settings may differ."""
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        return None
    return trace, TraceContextTextMapPropagator()


# -- enqueue --------------------------------------------------------------------


def current_trace_context() -> str | None:
    """The current span's W3C headers as JSON text, for a job's
    trace_context; None without OpenTelemetry or outside a span. A
    process that never imported opentelemetry.trace has no span, so it
    is not imported here: 6-11 ms, paid by the first enqueue (on the API
    child's event loop, by every connection it serves, in a handler by
    its job) with OpenTelemetry installed and unused."""
    if "opentelemetry.trace" not in sys.modules:
        return None
    api = _api()
    if api is None:
        return None
    trace, propagator = api
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    headers: dict[str, str] = {}
    propagator.inject(headers)
    return json.dumps(headers) if headers else None


# -- worker -----------------------------------------------------------------------


def traced_handlers(registry: HandlerRegistry, config: Config, dsn: str) -> HandlerRegistry:
    """The worker's handlers: `registry` itself unless [otel] is enabled;
    then a copy whose handlers run each attempt inside its span."""
    from pulsed.api import HandlerRegistry  # pulsed.api imports this module
    if not config.otel.enabled:
        return registry
    api = _api()
    if api is None:  # the config check refuses this; a worker must not crash on it
        log.warning("[otel] enabled, but OpenTelemetry is not installed: no spans")
        return registry
    spans = AttemptSpans(api[0].get_tracer(TRACER_NAME), api[1], StoredContexts(dsn))
    traced = HandlerRegistry()
    for job_type in registry.types():
        handler = registry.get(job_type)
        traced.register(job_type, spans.wrap(handler), max_attempts=handler.max_attempts,
                        timeout=handler.timeout)
    return traced


class StoredContexts:
    """Reads a job's stored trace context, on a connection of its own (the
    worker's is held by its main loop and lease keeper): one primary-key
    lookup per attempt, and only with tracing on."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()  # job threads share it

    def headers(self, job_id: int) -> dict[str, str] | None:
        """The job's W3C headers; None when it has none or they cannot be
        read now (the span then starts a trace of its own: tracing never
        fails a job)."""
        try:
            with self._lock:
                if self._conn is None or self._conn.closed:
                    self._conn = connect(self.dsn, "worker", instance="tracing",
                                         connect_timeout=CONNECT_TIMEOUT_S)
                stored = run_steps(self._conn, _trace_context_steps(job_id))
        except psycopg.Error as exc:
            log.warning("job %d: its trace context could not be read (%s); its span starts "
                        "a new trace", job_id, exc)
            return None
        return stored if isinstance(stored, dict) else None


def _trace_context_steps(job_id: int) -> Generator[Statement, list[Any], Any]:
    rows = yield Statement(queries()["job_trace_context"], {"id": job_id})
    return rows[0][0] if rows else None


class AttemptSpans:
    """One CONSUMER span per attempt, current while the handler runs (what
    the handler traces itself nests under it)."""

    def __init__(self, tracer: Any, propagator: Any, contexts: StoredContexts) -> None:
        self.tracer = tracer
        self.propagator = propagator
        self.contexts = contexts

    def wrap(self, handler: Handler) -> Callable[[Job], Any]:
        func = handler.func
        if handler.is_async:
            async def traced_async(job: Job) -> Any:
                # The lookup blocks: off the event loop that runs other jobs.
                headers = await asyncio.get_running_loop().run_in_executor(
                    None, self.contexts.headers, job.id)
                attempt = self._start(job, headers)
                try:
                    value = await func(job)
                except BaseException as exc:
                    attempt.end(exc)
                    raise
                attempt.end(None)
                return value
            return traced_async

        def traced(job: Job) -> Any:
            attempt = self._start(job, self.contexts.headers(job.id))
            try:
                value = func(job)
            except BaseException as exc:
                attempt.end(exc)
                raise
            attempt.end(None)
            return value
        return traced

    def _start(self, job: Job, headers: dict[str, str] | None) -> _Attempt:
        from opentelemetry import context, trace

        parent = self.propagator.extract(headers) if headers else None
        span = self.tracer.start_span(
            f"process {job.queue}", context=parent, kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": MESSAGING_SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": job.queue,
                "messaging.message.id": str(job.id),
                "pulse.job.type": job.type,
                "pulse.job.attempt": job.attempt,
                "pulse.job.max_attempts": job.max_attempts,
            })
        return _Attempt(job, span, context.attach(trace.set_span_in_context(span)))


class _Attempt:
    def __init__(self, job: Job, span: Any, token: Any) -> None:
        self.job = job
        self.span = span
        self.token = token
        self.pid = os.getpid()

    def end(self, error: BaseException | None) -> None:
        """Record how the handler ended and end the span. Not in a child
        the handler forked: that leaves at once, and the worker's own
        copy of the span is the one that ends (else it would be exported
        twice)."""
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        if os.getpid() != self.pid:
            return
        context.detach(self.token)
        outcome = attempt_outcome(self.job, error)
        self.span.set_attribute("pulse.job.outcome", outcome)
        if error is not None and outcome in FAILED_OUTCOMES:
            self.span.set_attribute("error.type", type(error).__qualname__)
            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
        self.span.end()


FAILED_OUTCOMES = frozenset({"error", "failed", "timeout"})


def attempt_outcome(job: Job, error: BaseException | None) -> str:
    """How the attempt ended, as its record will say (pulsed.jobs.Outcome),
    with `failed` for Fail (no retry)."""
    from pulsed.api import Fail, Snooze  # pulsed.api imports this module
    from pulsed.worker import JobTimeout

    if job.cancelled:
        return "cancelled"
    if error is None:
        return "completed"
    if isinstance(error, Snooze):
        return "snoozed"
    if isinstance(error, Fail):
        return "failed"
    if isinstance(error, (JobTimeout, asyncio.CancelledError)):
        # an async handler's timeout cancels its task (a cancelled job returned above)
        return "timeout"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return "error"
