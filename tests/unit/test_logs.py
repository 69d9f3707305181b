"""Job outcome lines: written a batch at a time, the same lines as logging's."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from pulsed import logs
from pulsed.metrics import JobReport


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """A buffer for setup() to point Pulse's handler at; the root logger
    restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    monkeypatch.setattr(logs, "_ours", None)
    yield io.StringIO()
    root.handlers[:], level = saved
    root.setLevel(level)


def setup(buffer: io.StringIO, fmt: str = "plain", level: str = "info") -> None:
    """setup_logging(), writing into buffer (pytest owns sys.stderr)."""
    logs.setup_logging(fmt, level)
    assert logs._ours is not None
    logs._ours.setStream(buffer)


def reports() -> list[JobReport]:
    now = time.time()
    return [JobReport(SimpleNamespace(id=7, type="email", attempt=1), "completed", 0.0123, None, now),
            JobReport(SimpleNamespace(id=8, type="répété", attempt=3), "error", 1.5, None, now + 0.5),
            JobReport(SimpleNamespace(id=9, type="email", attempt=2), "error", 0.25, None, now + 1,
                      error="RuntimeError: boom")]


def via_logging(logger: logging.Logger, batch: list[JobReport]) -> None:
    for report in batch:
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, *logs._job_message(report)[:1],
                                   logs._job_message(report)[1:], None,
                                   extra=logs._job_fields(report))
        record.created, record.msecs = report.ended_at, int(report.ended_at % 1 * 1000)
        logger.handle(record)


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_batched_lines_equal_the_lines_logging_writes(stderr: io.StringIO, fmt: str) -> None:
    setup(stderr, fmt)
    logger = logging.getLogger("pulsed.worker")
    batch = reports()
    assert logs._only_handler(logger, logs._ours)  # so the shortcut is what runs here
    logs.job_outcomes(logger, batch)
    fast = stderr.getvalue()
    stderr.seek(0), stderr.truncate()
    via_logging(logger, batch)
    assert fast == stderr.getvalue()
    assert len(fast.splitlines()) == 3
    # A retry's line carries its error (issue 24, item 9).
    assert "job email#9 attempt 2 error in 0.250s: RuntimeError: boom" in fast
    if fmt == "json":
        entry = json.loads(fast.splitlines()[1])
        assert (entry["job_id"], entry["job_type"], entry["attempt"], entry["outcome"]) == (
            8, "répété", 3, "error")
        assert entry["message"] == "job répété#8 attempt 3 error in 1.500s"


def test_batched_lines_go_through_logging_when_other_handlers_listen(
        stderr: io.StringIO) -> None:
    setup(stderr)
    logger = logging.getLogger("pulsed.worker")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    extra = Keep()
    logger.addHandler(extra)
    try:
        logs.job_outcomes(logger, reports())
    finally:
        logger.removeHandler(extra)
    assert [r.job_id for r in seen] == [7, 8, 9]  # type: ignore[attr-defined]
    assert len(stderr.getvalue().splitlines()) == 3  # propagated to ours as well


def test_no_lines_below_info(stderr: io.StringIO) -> None:
    setup(stderr, level="warning")
    logs.job_outcomes(logging.getLogger("pulsed.worker"), reports())
    assert stderr.getvalue() == ""
