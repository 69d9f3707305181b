"""OpenTelemetry across a real daemon: enqueue records the enqueuer's trace
context with the job; with [otel] enabled each attempt runs in a CONSUMER
span continuing that trace (the messaging semantic conventions' attributes,
the attempt's outcome), and a job enqueued inside that span joins it: one
trace from the request that enqueued to the last job's end. Disabled, the
worker makes no spans. The workers' spans come back through the file that
tests/contrib/otel_jobs.py's exporter writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter)

import pulsed  # noqa: E402
from pulsed.db.store import Store  # noqa: E402
from tests.pg import wait_until  # noqa: E402
from tests.system.daemon import Daemon  # noqa: E402

pytestmark = pytest.mark.timeout(90)


def start_daemon(root: Path, dsn: str, spans: Path, *, enabled: bool) -> Daemon:
    daemon = Daemon(root, dsn, workers=1, env={"PULSE_TEST_SPANS": str(spans)}, config={
        "worker": {"handlers": ["tests.contrib.otel_jobs"], "poll_interval": 0.2},
        "otel": {"enabled": enabled}})
    return daemon.start()


def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def consumer_spans(path: Path) -> list[dict[str, Any]]:
    return [span for span in read_spans(path) if span["kind"] == "CONSUMER"]


def wait_finished(conn: psycopg.Connection, count: int, daemon: Daemon) -> None:
    wait_until(lambda: conn.execute(
        "SELECT count(*) FROM pulse_jobs WHERE state IN ('completed', 'failed')"
    ).fetchone()[0] == count, timeout=30, message=lambda: f"jobs unfinished; log:\n"
                                                         f"{daemon.log_tail()}")


def test_one_trace_from_enqueue_to_completion(dsn: str, conn: psycopg.Connection,
                                              tmp_path: Path) -> None:
    spans_file = tmp_path / "spans.jsonl"
    daemon = start_daemon(tmp_path / "daemon", dsn, spans_file, enabled=True)
    try:
        # The application's side: its own SDK, a request span around the enqueues.
        app_spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(app_spans))
        with provider.get_tracer("app").start_as_current_span("POST /orders") as request:
            with psycopg.connect(dsn) as app:
                ok = pulsed.enqueue(app, "traced.ok", {"n": 1}, queue="default")
                boom = pulsed.enqueue(app, "traced.boom")
                chain = pulsed.enqueue(app, "traced.chain", {"dsn": dsn})
                [in_async, fork] = pulsed.enqueue_many(app, [{"type": "traced.async"},
                                                             {"type": "traced.fork"}])
        untraced = pulsed.enqueue(conn, "traced.ok", {"n": 2})  # outside any span
        trace_id = f"{request.get_span_context().trace_id:032x}"
        request_id = f"{request.get_span_context().span_id:016x}"
        stored = Store(conn)
        assert conn.execute("SELECT trace_context->>'traceparent' FROM pulse_jobs "
                            "WHERE id = %s", [ok]).fetchone()[0] == \
            f"00-{trace_id}-{request_id}-{request.get_span_context().trace_flags:02x}"
        assert conn.execute("SELECT trace_context FROM pulse_jobs WHERE id = %s",
                            [untraced]).fetchone()[0] is None

        wait_finished(conn, 7, daemon)  # the six, and the one chain enqueued
        assert stored.get_job(boom).state == pulsed.JobState.FAILED
        # ok, boom x2, chain, async, fork, untraced, the chained ok: 8 attempts
        process = wait_until(lambda: spans if len(spans := consumer_spans(spans_file)) == 8
                             else None,
                             timeout=10, message=lambda: f"spans: {read_spans(spans_file)}")
    finally:
        daemon.kill_all()

    by_job: dict[int, list[dict[str, Any]]] = {}
    for span in process:
        by_job.setdefault(int(span["attributes"]["messaging.message.id"]), []).append(span)
        assert span["name"] == "process default"
        assert {k: span["attributes"][k] for k in (
            "messaging.system", "messaging.operation.type", "messaging.destination.name")} == {
            "messaging.system": "pulse", "messaging.operation.type": "process",
            "messaging.destination.name": "default"}

    for job_id, outcome in ((ok, "completed"), (chain, "completed"), (in_async, "completed"),
                            (fork, "completed")):  # fork: one span, not one per process
        [span] = by_job[job_id]
        assert (span["trace_id"], span["parent_id"]) == (trace_id, request_id)
        assert span["attributes"]["pulse.job.outcome"] == outcome
        assert span["attributes"]["pulse.job.attempt"] == 1
        assert span["status"] == "UNSET"
    assert by_job[in_async][0]["attributes"]["pulse.job.type"] == "traced.async"

    attempts = sorted(by_job[boom], key=lambda s: s["attributes"]["pulse.job.attempt"])
    assert [s["attributes"]["pulse.job.attempt"] for s in attempts] == [1, 2]
    for span in attempts:
        assert span["trace_id"] == trace_id and span["parent_id"] == request_id
        assert span["attributes"]["pulse.job.outcome"] == "error"
        assert span["attributes"]["error.type"] == "ValueError"
        assert span["status"] == "ERROR" and "exception" in span["events"]

    # The job the chain handler enqueued continues the trace under its span.
    [chained_id] = [j for j in by_job if j not in (ok, boom, chain, in_async, fork, untraced)]
    [chained] = by_job[chained_id]
    assert (chained["trace_id"], chained["parent_id"]) == (trace_id, by_job[chain][0]["span_id"])
    # The handler's own span nests under its attempt's.
    inner = [s for s in read_spans(spans_file) if s["name"] == "inner work"]
    assert {s["parent_id"] for s in inner} == {by_job[ok][0]["span_id"], chained["span_id"],
                                               by_job[untraced][0]["span_id"]}
    # Enqueued outside a span: its attempt starts a trace of its own.
    [alone] = by_job[untraced]
    assert alone["parent_id"] is None and alone["trace_id"] != trace_id
    assert [s.name for s in app_spans.get_finished_spans()] == ["POST /orders"]


def test_disabled_by_default_no_spans_from_the_worker(dsn: str, conn: psycopg.Connection,
                                                      tmp_path: Path) -> None:
    spans_file = tmp_path / "spans.jsonl"
    daemon = start_daemon(tmp_path / "daemon", dsn, spans_file, enabled=False)
    try:
        provider = TracerProvider()
        with provider.get_tracer("app").start_as_current_span("request"):
            job_id = pulsed.enqueue(conn, "traced.ok")
        wait_finished(conn, 1, daemon)
    finally:
        daemon.kill_all()
    spans = read_spans(spans_file)
    # The handler's own span is there (its module set up the SDK), with no
    # Pulse span for a parent: the worker made none.
    assert [(s["name"], s["kind"], s["parent_id"]) for s in spans] == [
        ("inner work", "INTERNAL", None)]
    assert Store(conn).get_job(job_id).state == pulsed.JobState.COMPLETED
