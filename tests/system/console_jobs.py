"""Handlers for the console's browser tests (tests/system/test_console.py)."""

from __future__ import annotations

import pulsed


@pulsed.handler("fail_first")
def fail_first(job: pulsed.Job) -> None:
    """Fails its first attempt (enqueued with max_attempts=1 it fails for
    good), succeeds on any later one: a retry from the console runs it."""
    if job.attempt == 1:
        raise RuntimeError("first attempt fails on purpose")
