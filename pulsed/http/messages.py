"""The HTTP API's messages: requests, responses, errors, and the checks on
what a client sent (body, path and query parameters), each failing with a
400 that names the field."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

from pulsed.errors import PulseError

MAX_QUERY_FIELDS = 50
MAX_ID = 2**63 - 1


class HttpError(PulseError):
    """A request failed; the client gets status and a JSON error."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 **extra: Any) -> None:
        self.status, self.code, self.message, self.field = status, code, message, field
        self.extra = extra
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field,
                          **self.extra}}


def invalid(field: str | None, message: str) -> HttpError:
    return HttpError(400, "invalid_argument", message, field)


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


# One encoder for every response: json.dumps with options builds one per
# call, 40% of a job's encoding time.
_RESPONSE_JSON = json.JSONEncoder(ensure_ascii=False, default=str, allow_nan=False)


def json_response(status: int, data: Any, **headers: str) -> Response:
    text = _RESPONSE_JSON.encode(data)
    return Response(status, text.encode(), headers=dict(headers))


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: dict[str, str]  # from the path: {"id": "42"}
    query: str
    headers: Mapping[str, str]
    body: bytes


def json_object(body: bytes, *, arrays: bool = False) -> Any:
    """The body's JSON object (or, with `arrays`, an object or an array)."""
    if not body.strip():
        raise invalid("body", 'the body is empty; send a JSON object like {"type": "email"}')
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, …
        raise invalid("body", f"the body is not valid JSON: {first_line(exc)}") from None
    if not isinstance(data, dict) and not (arrays and isinstance(data, list)):
        wanted = "a JSON object or an array of them" if arrays else "a JSON object"
        raise invalid("body", f"the body must be {wanted}, got {json_type(data)}")
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise invalid("body", "the body holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                              "which is not text") from None
    return data


def parse_timestamp(name: str, value: Any) -> datetime:
    example = "like 2030-01-01T12:00:00Z or 2030-01-01T13:00:00+01:00"
    if not isinstance(value, str):
        raise invalid(name, f"{name} must be an ISO 8601 string {example}, "
                            f"got {json_type(value)}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise invalid(name, f"{name} must be an ISO 8601 timestamp {example}") from None
    if moment.tzinfo is None:
        raise invalid(name, f"{name} needs a timezone ({example})")
    return moment


def parse_job_id(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 19 or not 0 < int(text) <= MAX_ID:
        raise invalid("id", f"a job id is a positive integer, got {text[:40]!r}")
    return int(text)


def parse_query(text: str) -> dict[str, str]:
    """Query parameters; the last of repeated ones counts, blank ones are absent."""
    try:
        pairs = parse_qs(text, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise invalid(None, f"too many query parameters (at most {MAX_QUERY_FIELDS})") from None
    return {key: values[-1] for key, values in pairs.items() if values[-1] != ""}


def int_param(query: Mapping[str, str], name: str, low: int, high: int,
              default: int | None) -> int | None:
    text = query.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 19 and low <= int(text) <= high):
        raise invalid(name, f"{name} must be an integer from {low} to {high}, got {text[:40]!r}")
    return int(text)


def float_param(query: Mapping[str, str], name: str, low: float, high: float) -> float:
    """A number of seconds from the query string, within [low, high]."""
    text = query.get(name, "")
    try:
        value = float(text) if len(text) <= 40 else math.nan
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # NaN fails too
        raise invalid(name, f"{name} must be a number of seconds from {low:g} to {high:g}, "
                            f"got {text[:40]!r}")
    return value


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:500] if lines else type(exc).__name__
