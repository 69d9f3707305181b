"""Handlers for the OpenTelemetry system test (tests/contrib/test_otel.py),
imported by the daemon's workers: this module sets up their SDK, as an
application's handler module would, with the SDK's InMemorySpanExporter
extended to append each finished span to the file PULSE_TEST_SPANS names
(one JSON object a line), which the test reads."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from typing import Any

import psycopg
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import pulsed


class FileSpanExporter(InMemorySpanExporter):
    """The in-memory exporter, shipping each span to the test's file too."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = super().export(spans)
        with open(self.path, "a") as out:
            for span in spans:
                out.write(json.dumps(span_record(span)) + "\n")  # one write a line: O_APPEND
        return result


def span_record(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    return {
        "name": span.name, "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "attributes": dict(span.attributes or {}), "status": span.status.status_code.name,
        "events": [event.name for event in span.events],
    }


# SimpleSpanProcessor: exported as each span ends (a worker leaves through
# os._exit, so a batch processor's last batch would be lost at a stop).
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(os.environ["PULSE_TEST_SPANS"])))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("tests.contrib.otel_jobs")


@pulsed.handler("traced.ok")
def ok(job: pulsed.Job) -> dict[str, int]:
    with tracer.start_as_current_span("inner work"):  # the handler's own span nests
        return {"n": job.payload.get("n", 0)}


@pulsed.handler("traced.boom", max_attempts=2)
def boom(job: pulsed.Job) -> None:
    raise ValueError(f"boom on attempt {job.attempt}")


@pulsed.handler("traced.async")
async def in_async(job: pulsed.Job) -> str:
    await asyncio.sleep(0)
    return "async done"


@pulsed.handler("traced.chain")
def chain(job: pulsed.Job) -> None:
    """Enqueues a follow-up inside its span: the follow-up joins the trace."""
    with psycopg.connect(job.payload["dsn"]) as conn:
        pulsed.enqueue(conn, "traced.ok", {"n": 99})


@pulsed.handler("traced.fork")
def forks(job: pulsed.Job) -> None:
    """Returns in a forked child too (which the worker makes leave at once):
    the attempt's span must be exported once, by the worker."""
    child = os.fork()
    if child:
        os.waitpid(child, 0)
