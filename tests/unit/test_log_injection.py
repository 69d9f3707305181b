"""A job's type and error reach the daemon's own log lines (stderr,
journald): a newline or CR in a handler's error forged a line from another
process, and ESC sequences reached the terminal pulsed runs in. Plain lines
show them escaped, in the batched job outcome lines and through logging
alike; JSON lines keep the text exact."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from types import SimpleNamespace

import pytest

from pulsed import logs
from pulsed.metrics import JobReport
from tests.unit.test_logs import setup, stderr, via_logging  # noqa: F401

FORGED = ("RuntimeError: boom\n2026-12-05 00:00:00,000 INFO    master[1] pulsed.master: "
          "all jobs completed\r\x1b[2J\x1b]52;c;ZXZpbA==\x07\x9b31m\u202ex")
TERMINAL_CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def batch() -> list[JobReport]:
    job = SimpleNamespace(id=9, type="evil\u202etype", attempt=1)
    return [JobReport(job, "error", 0.25, None, time.time(), error=FORGED)]


def assert_one_line_a_record(text: str, records: int) -> None:
    assert len(text.splitlines()) == records, text
    assert TERMINAL_CONTROLS.search(text) is None, text
    assert "master[1]" not in text.split(" ", 4)[3]  # every line begins with its own process


def test_a_hostile_error_is_one_escaped_log_line(stderr: io.StringIO) -> None:  # noqa: F811
    setup(stderr)
    logger = logging.getLogger("pulsed.worker")
    reports = batch()
    logs.job_outcomes(logger, reports)  # the batched shortcut
    fast = stderr.getvalue()
    assert_one_line_a_record(fast, 1)
    assert ("job evil\\u202etype#9 attempt 1 error in 0.250s: RuntimeError: boom\\n2026-12-05 "
            "00:00:00,000 INFO    master[1] pulsed.master: all jobs completed\\r\\x1b[2J") in fast
    stderr.seek(0), stderr.truncate()
    via_logging(logger, reports)  # the same line through logging
    assert stderr.getvalue() == fast
    stderr.seek(0), stderr.truncate()
    logger.error("job %s#%d failed for good: %s", "t", 9, FORGED)
    assert_one_line_a_record(stderr.getvalue(), 1)


def test_a_traceback_keeps_its_lines(stderr: io.StringIO) -> None:  # noqa: F811
    setup(stderr)
    try:
        raise ValueError("inner")
    except ValueError:
        logging.getLogger("pulsed.master").exception("child crashed")
    lines = stderr.getvalue().splitlines()
    assert lines[0].endswith("pulsed.master: child crashed")
    assert lines[1] == "Traceback (most recent call last):" and lines[-1] == "ValueError: inner"


def test_json_lines_keep_the_error_exact(stderr: io.StringIO) -> None:  # noqa: F811
    setup(stderr, "json")
    logs.job_outcomes(logging.getLogger("pulsed.worker"), batch())
    [line] = stderr.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["error"] == FORGED and entry["job_type"] == "evil\u202etype"
