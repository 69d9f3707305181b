"""The enqueue side of OpenTelemetry, without a daemon: every enqueue
function stores the current span's W3C context with its jobs (the async
ones too: contextvars follow the task), nothing outside a span; and the
[otel] switch: validated, refused without the package."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import psycopg
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402

import pulsed  # noqa: E402
from pulsed.config import parse_config  # noqa: E402
from pulsed.errors import ConfigError  # noqa: E402

tracer = TracerProvider().get_tracer("test")


def stored(conn: psycopg.Connection, job_id: int) -> dict[str, str] | None:
    return conn.execute("SELECT trace_context FROM pulse_jobs WHERE id = %s",
                        [job_id]).fetchone()[0]


def traceparent(span: object) -> str:
    context = span.get_span_context()  # type: ignore[attr-defined]
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def test_every_enqueue_stores_the_current_context(dsn: str, conn: psycopg.Connection) -> None:
    outside = pulsed.enqueue(conn, "t")
    with tracer.start_as_current_span("request") as span:
        single = pulsed.enqueue(conn, "t")
        many = pulsed.enqueue_many(conn, [{"type": "t"}, {"type": "t", "idempotency_key": "k"}])

        async def in_async() -> list[int]:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
                return [await pulsed.enqueue_async(aconn, "t"),
                        *await pulsed.enqueue_many_async(aconn, [{"type": "t"}])]

        async_ids = asyncio.run(in_async())
    with tracer.start_as_current_span("another") as other:
        mixed = pulsed.enqueue_many(conn, [{"type": "t"}])
    assert stored(conn, outside) is None
    for job_id in (single, *many, *async_ids):
        assert stored(conn, job_id) == {"traceparent": traceparent(span)}
    assert stored(conn, mixed[0]) == {"traceparent": traceparent(other)}


def test_tracestate_travels_too(conn: psycopg.Connection) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    context = SpanContext(trace_id=0x1234, span_id=0x42, is_remote=True,
                          trace_flags=TraceFlags(1), trace_state=TraceState([("vendor", "v1")]))
    with trace.use_span(NonRecordingSpan(context)):
        job_id = pulsed.enqueue(conn, "t")
    assert stored(conn, job_id) == {
        "traceparent": f"00-{0x1234:032x}-{0x42:016x}-01", "tracestate": "vendor=v1"}


def test_the_otel_switch_is_validated() -> None:
    assert parse_config({}, env={}).otel.enabled is False
    assert parse_config({"otel": {"enabled": True}}, env={}).otel.enabled is True
    assert parse_config({}, env={"PULSE_OTEL_ENABLED": "true"}).otel.enabled is True
    with pytest.raises(ConfigError, match="otel.enabled.*true or false"):
        parse_config({"otel": {"enabled": "yes"}}, env={})
    with pytest.raises(ConfigError, match="did you mean 'otel.enabled'"):
        parse_config({"otel": {"enable": True}}, env={})


def test_enabled_without_opentelemetry_is_refused_and_enqueue_records_nothing() -> None:
    """In a Python where opentelemetry cannot be imported (a finder refuses it)."""
    script = textwrap.dedent('''
        import importlib.abc, sys
        class NoOtel(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ModuleNotFoundError(f"No module named {name!r}")
        sys.meta_path.insert(0, NoOtel())
        import pulsed
        from pulsed.config import parse_config
        from pulsed.errors import ConfigError
        assert pulsed.api.job_params(type="t")["trace_context"] is None
        try:
            parse_config({"otel": {"enabled": True}}, env={})
        except ConfigError as exc:
            print(exc)
        else:
            print("accepted")
    ''')
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "otel.enabled" in result.stdout and "pulse-queue[otel]" in result.stdout


def test_an_enqueue_in_a_process_without_spans_does_not_import_opentelemetry(dsn: str) -> None:
    """Installed but unused, the import (6-11 ms) was paid by the first
    enqueue: in the API child on its event loop, in a handler by its job."""
    script = textwrap.dedent("""
        import sys, psycopg, pulsed
        with psycopg.connect(sys.argv[1]) as conn:
            pulsed.enqueue(conn, "t")
            pulsed.enqueue_many(conn, [{"type": "t"}])
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
    """)
    result = subprocess.run([sys.executable, "-c", script, dsn], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
