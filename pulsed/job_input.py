"""A job's input, checked before anything is written: every argument of
enqueue (pulsed/api.py), the HTTP API's POST /jobs and `pulsectl enqueue`
goes through job_params(), and a bad one raises JobInputError naming it."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from pulsed.contrib.otel import current_trace_context
from pulsed.errors import JobInputError

DEFAULT_QUEUE = "default"
DEFAULT_PRIORITY = 0
SMALLINT_MIN, SMALLINT_MAX = -32768, 32767
INT_MAX = 2**31 - 1
# A payload is stored inline in the jobs table; past this it belongs in the
# application's own storage, with a reference in the payload.
MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_TEXT_LENGTH = 255  # type, queue and idempotency key
# unique_while's values: how long a job holds its idempotency key.
UNIQUE_WHILE_UNFINISHED = "unfinished"  # until it completes, fails or is cancelled
UNIQUE_WHILE = (UNIQUE_WHILE_UNFINISHED,)
# Payloads and results nest at most this deep. Python 3.11's json module
# gave up near 1,000 levels (the recursion limit) and 3.12+ goes far deeper,
# so a payload one version wrote could fail to load in a worker on another;
# one bound, well inside every version's, makes "accepted" mean "readable".
MAX_JSON_DEPTH = 500
MAX_SECONDS = 100 * 365 * 86400.0  # delays and timeouts: beyond this, a mistake
# A job's run_at, after conversion to UTC. Python reads only years 1..9999,
# in the session's time zone: a value PostgreSQL stores outside that (year
# 1 BC from datetime(1, 1, 1) at +14:00) crashed every worker that claimed
# it. The upper bound keeps a day of margin so any time zone reads it; the
# lower one refuses what no scheduler means (an epoch-0 sentinel works).
# A delay is at most MAX_SECONDS, so now + delay stays inside too.
RUN_AT_MIN = datetime(1970, 1, 1, tzinfo=timezone.utc)
RUN_AT_MAX = datetime(9999, 12, 30, tzinfo=timezone.utc)
# A timeout is stored as a PostgreSQL real: below ~1e-38 it underflows and
# aborts the caller's transaction. Under a millisecond no timer is honest.
TIMEOUT_MIN_S = 0.001
TIMEOUT_MAX_S = MAX_SECONDS
# Control characters (Unicode category Cc) in type, queue and idempotency
# key: a newline forges log lines, NUL PostgreSQL refuses.
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")


def job_params(*, type: str, payload: Mapping[str, Any] | None = None,
               priority: int = DEFAULT_PRIORITY, run_at: datetime | None = None,
               delay: float | None = None, max_attempts: int | None = None,
               idempotency_key: str | None = None, queue: str = DEFAULT_QUEUE,
               timeout: float | None = None, unique_while: str | None = None,
               unique_for: float | None = None) -> dict[str, Any]:
    """Validate one job's arguments into the row the store inserts."""
    check_text("type", type)
    check_text("queue", queue)
    if idempotency_key is not None:
        check_text("idempotency_key", idempotency_key)
    _check_unique_scope(idempotency_key, unique_while, unique_for)
    _check_int("priority", priority, SMALLINT_MIN, SMALLINT_MAX)
    if max_attempts is not None:
        _check_int("max_attempts", max_attempts, 1, INT_MAX)
    if timeout is not None:
        _check_timeout(timeout)
    if run_at is not None and delay is not None:
        raise JobInputError("run_at", "give run_at or delay, not both")
    if run_at is not None:
        _check_run_at(run_at)
    if delay is not None:
        _check_seconds("delay", delay, allow_zero=True)
    return {
        "type": type, "queue": queue, "payload": _checked_payload(payload),
        "priority": priority, "run_at": run_at, "delay": float(delay or 0.0),
        "max_attempts": max_attempts,  # None: the type's default, resolved at claim
        "idempotency_key": idempotency_key,
        "timeout": None if timeout is None else float(timeout),  # one type per bulk column
        "unique_while": unique_while,
        "unique_for": None if unique_for is None else float(unique_for),
        "trace_context": current_trace_context(),  # the enqueuer's span, if it traces
    }


def _check_unique_scope(idempotency_key: str | None, unique_while: Any,
                        unique_for: Any) -> None:
    """unique_while or unique_for: at most one, and only with a key to scope."""
    if unique_while is not None and unique_while not in UNIQUE_WHILE:
        raise JobInputError("unique_while", f"must be {' or '.join(map(repr, UNIQUE_WHILE))}, "
                                            f"got {unique_while!r}")
    if unique_for is not None:
        _check_seconds("unique_for", unique_for, allow_zero=False)
    if unique_while is not None and unique_for is not None:
        raise JobInputError("unique_for", "give unique_while or unique_for, not both")
    if idempotency_key is None:
        for name, value in (("unique_while", unique_while), ("unique_for", unique_for)):
            if value is not None:
                raise JobInputError(name, "needs an idempotency_key (it scopes that key)")


def check_text(name: str, value: Any) -> None:
    """A type, queue or idempotency key (pulsectl queue pause checks a name so)."""
    if not isinstance(value, str):
        raise JobInputError(name, f"must be a string, got {type(value).__name__}")
    if not _is_utf8(value):
        raise JobInputError(name, "must be valid Unicode text (it has a lone surrogate)")
    if not value.strip():
        raise JobInputError(name, "must not be empty")
    if len(value) > MAX_TEXT_LENGTH:
        raise JobInputError(name, f"must be at most {MAX_TEXT_LENGTH} characters")
    # ASCII text (nearly all) is checked in C: printable ASCII is exactly
    # ASCII without its control characters.
    if not (value.isascii() and value.isprintable()) and (
            control := _CONTROL_CHARACTER.search(value)):
        raise JobInputError(name, f"must not contain control characters such as NUL or "
                                  f"newline (U+0000..U+001F, U+007F..U+009F), got "
                                  f"{control[0]!r}")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def nested_deeper_than(limit: int, value: Any, text: str) -> bool:
    """Whether JSON data (value, serialised as text) nests more than limit
    arrays and objects deep. A count of brackets bounds the depth, so only
    text with more than limit of them is walked (iteratively: no recursion
    limit to hit)."""
    if text.count("{") + text.count("[") <= limit:
        return False
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, Mapping) else node
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (Mapping, list, tuple)))
    return False


def _bad_strings(value: Any) -> str | None:
    """What PostgreSQL's jsonb would refuse in any string key or value:
    NUL characters and lone surrogates."""
    if isinstance(value, str):
        if "\x00" in value:
            return "must not contain NUL characters (PostgreSQL jsonb refuses them)"
        if not _is_utf8(value):
            return "must be valid Unicode text (a string has a lone surrogate)"
        return None
    if isinstance(value, Mapping):
        items = [item for pair in value.items() for item in pair]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        return None
    return next((p for p in map(_bad_strings, items) if p), None)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise JobInputError(name, f"must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise JobInputError(name, f"must be between {low} and {high}, got {value}")


def _check_seconds(name: str, value: Any, *, allow_zero: bool) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise JobInputError(name, f"must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise JobInputError(name, f"must be a finite number {bound}, got {value!r}")
    if value > MAX_SECONDS:
        raise JobInputError(name, f"must be at most {MAX_SECONDS:.0f} seconds (100 years), "
                                  f"got {value!r}")


def _check_timeout(value: Any) -> None:
    _check_seconds("timeout", value, allow_zero=False)
    if not TIMEOUT_MIN_S <= value <= TIMEOUT_MAX_S:
        raise JobInputError("timeout", f"must be between {TIMEOUT_MIN_S:g} and "
                                       f"{TIMEOUT_MAX_S:.0f} seconds, got {value!r}")


def _check_run_at(run_at: Any) -> None:
    if not isinstance(run_at, datetime):
        raise JobInputError("run_at", f"must be a datetime, got {type(run_at).__name__}")
    if run_at.tzinfo is None or run_at.utcoffset() is None:
        raise JobInputError("run_at", "must be timezone-aware (a naive datetime is ambiguous)")
    # Compared, not converted: astimezone() overflows on year 1 at +14:00.
    if not RUN_AT_MIN <= run_at <= RUN_AT_MAX:
        raise JobInputError("run_at", f"must be between {RUN_AT_MIN.isoformat()} and "
                                      f"{RUN_AT_MAX.isoformat()} (UTC), got {run_at.isoformat()}")


# One encoder for every payload (json.dumps with options builds one per call).
# ensure_ascii (the default) escapes NULs and surrogates, which the checks use.
_JSON = json.JSONEncoder(allow_nan=False)


def _checked_payload(payload: Any) -> str:
    """The payload as JSON text (serialised once, here)."""
    if payload is None:
        return "{}"
    if not isinstance(payload, Mapping):
        raise JobInputError("payload", f"must be a JSON object (a dict), got {type(payload).__name__}")
    try:
        text = _JSON.encode(payload)
    except (TypeError, ValueError) as exc:
        raise JobInputError("payload", f"cannot be serialised to JSON: {exc}") from None
    except RecursionError:
        raise JobInputError("payload", "is nested too deeply to serialise") from None
    if nested_deeper_than(MAX_JSON_DEPTH, payload, text):
        raise JobInputError("payload", f"is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        # json.dumps escapes NULs and surrogates as \u sequences, so only
        # text with such an escape (rare) needs the walk that says which.
        problem = _bad_strings(payload) if "\\u0000" in text or "\\ud" in text else None
    except RecursionError:
        raise JobInputError("payload", "is nested too deeply to serialise") from None
    if problem:
        raise JobInputError("payload", problem)
    if len(text) > MAX_PAYLOAD_BYTES:  # ASCII (non-ASCII is escaped): characters are bytes
        raise JobInputError("payload", f"is {len(text)} bytes serialised; the limit is {MAX_PAYLOAD_BYTES}")
    return text
