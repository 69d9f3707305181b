"""Unit tests for the control protocol (framing, validation, error codes, scale
specs) and pulsectl's rendering of its shapes."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from rich.console import Console

from pulsectl import render
from pulsed import serialize
from pulsed.control import protocol
from pulsed.control.protocol import (
    BAD_REQUEST, INVALID_ARGUMENT, UNKNOWN_COMMAND, ControlError, decode, encode,
    parse_request, reply_result, resolve_workers, validate_request,
)
from pulsed.jobs import Attempt, JobRecord, JobState

# -- framing -----------------------------------------------------------------------


def test_encode_is_one_ascii_line() -> None:
    line = encode({"cmd": "status", "note": "two\nlines, é ☃"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert line.isascii()
    assert decode(line) == {"cmd": "status", "note": "two\nlines, é ☃"}


def test_encode_refuses_what_json_cannot_carry() -> None:
    with pytest.raises(ValueError):
        encode({"age": float("nan")})
    with pytest.raises(TypeError):
        encode({"who": {1, 2}})


@pytest.mark.parametrize("line", [
    b"", b"\x00\xff\xfe", b"\xff\xfe{}", b'{"cmd": "\xc3"}', b"not json", b"[1, 2]", b'"hello"',
    b"42", b"null", b"true", b'{"cmd": "status"', b'{"cmd": "status"} trailing',
    b"[" * 100_000, b'{"a":' * 50_000, b"1" * 5000,
])
def test_decode_turns_any_garbage_into_bad_request(line: bytes) -> None:
    with pytest.raises(ControlError) as info:
        decode(line)
    assert info.value.code == BAD_REQUEST
    assert len(info.value.message) < 500


def test_decode_accepts_an_object_with_its_newline() -> None:
    assert decode(b'{"cmd": "hello"}\r\n') == {"cmd": "hello"}


def test_replies() -> None:
    assert protocol.ok_reply({"workers": 3, "ok": "ignored"}) == {"ok": True, "workers": 3}
    assert protocol.error_reply("timeout", "too slow") == {
        "ok": False, "error": {"code": "timeout", "message": "too slow"}}
    assert reply_result({"ok": True, "workers": 3}) == {"workers": 3}
    with pytest.raises(ControlError) as info:
        reply_result(protocol.error_reply("forbidden", "not you"))
    assert (info.value.code, info.value.message) == ("forbidden", "not you")
    for malformed in ({"workers": 3}, [], {"ok": "yes"}):
        with pytest.raises(ControlError) as info:
            reply_result(malformed)
        assert info.value.code == BAD_REQUEST


def test_a_malformed_error_reply_still_raises() -> None:
    with pytest.raises(ControlError) as info:
        reply_result({"ok": False, "error": "boom"})
    assert info.value.code == protocol.INTERNAL


# -- error codes ----------------------------------------------------------------------


def test_error_codes_are_stable() -> None:
    assert protocol.ERROR_CODES == {"bad_request", "unknown_command", "invalid_argument",
                                    "forbidden", "shutting_down", "timeout", "busy",
                                    "failed", "internal"}


def test_control_error_carries_code_and_message() -> None:
    error = ControlError("invalid_argument", "workers must be N")
    assert (error.code, error.message) == ("invalid_argument", "workers must be N")
    assert "workers must be N" in str(error) and "invalid_argument" in str(error)


# -- requests ------------------------------------------------------------------------


def test_read_and_write_commands_are_kept_apart() -> None:
    reads = {name for name, command in protocol.COMMANDS.items() if not command.writes}
    writes = {name for name, command in protocol.COMMANDS.items() if command.writes}
    assert reads == {"hello", "status", "logs"}
    assert writes == {"scale", "drain", "resume", "reload", "stop", "restart"}


@pytest.mark.parametrize("message, args", [
    ({"cmd": "restart", "role": "worker", "index": 2}, {"role": "worker", "index": 2}),
    ({"cmd": "restart", "role": "scheduler"}, {"role": "scheduler", "index": 0}),
    ({"cmd": "logs"}, {"role": None, "index": None, "lines": 100, "after": None}),
    ({"cmd": "logs", "role": "api", "lines": 0, "after": 7},
     {"role": "api", "index": None, "lines": 0, "after": 7}),
])
def test_restart_and_logs_take_a_child_by_role_and_index(message, args) -> None:
    assert dict(protocol.validate_request(message).args) == args


@pytest.mark.parametrize("message", [
    {"cmd": "restart"}, {"cmd": "restart", "role": "master"},
    {"cmd": "restart", "role": "worker", "index": -1},
    {"cmd": "restart", "role": "worker", "index": True},
    {"cmd": "logs", "lines": protocol.MAX_LOG_LINES + 1}, {"cmd": "logs", "after": "x"},
])
def test_restart_and_logs_refuse_bad_arguments(message) -> None:
    with pytest.raises(ControlError) as caught:
        protocol.validate_request(message)
    assert caught.value.code == "invalid_argument"


@pytest.mark.parametrize(("message", "args"), [
    ({"cmd": "hello"}, {}),
    ({"cmd": "status"}, {}),
    ({"cmd": "scale", "workers": 8}, {"workers": 8}),
    ({"cmd": "scale", "workers": " +2 "}, {"workers": "+2"}),
    ({"cmd": "drain"}, {"wait": False, "timeout": None}),
    ({"cmd": "drain", "wait": True, "timeout": 30}, {"wait": True, "timeout": 30.0}),
    ({"cmd": "drain", "wait": True, "timeout": None}, {"wait": True, "timeout": None}),
    ({"cmd": "stop"}, {"now": False}),
    ({"cmd": "stop", "now": True}, {"now": True}),
])
def test_valid_requests_get_their_defaults(message: dict[str, Any],
                                           args: dict[str, Any]) -> None:
    request = validate_request(message)
    assert request.cmd == message["cmd"]
    assert dict(request.args) == args


@pytest.mark.parametrize(("message", "code"), [
    ({}, BAD_REQUEST),
    ({"cmd": None}, BAD_REQUEST),
    ({"cmd": 1}, BAD_REQUEST),
    ({"cmd": {"name": "status"}}, BAD_REQUEST),
    ({"cmd": "explode"}, UNKNOWN_COMMAND),
    ({"cmd": "STATUS"}, UNKNOWN_COMMAND),
    ({"cmd": "status", "extra": 1}, INVALID_ARGUMENT),
    ({"cmd": "scale"}, INVALID_ARGUMENT),
    ({"cmd": "scale", "workers": None}, INVALID_ARGUMENT),
    ({"cmd": "scale", "workers": True}, INVALID_ARGUMENT),
    ({"cmd": "scale", "workers": 1.5}, INVALID_ARGUMENT),
    ({"cmd": "scale", "workers": "workers=3"}, INVALID_ARGUMENT),
    ({"cmd": "scale", "workers": "++3"}, INVALID_ARGUMENT),
    ({"cmd": "scale", "workers": "3x"}, INVALID_ARGUMENT),
    ({"cmd": "scale", "workers": "٣"}, INVALID_ARGUMENT),  # a non-ASCII digit
    ({"cmd": "drain", "wait": 1}, INVALID_ARGUMENT),
    ({"cmd": "drain", "wait": True, "timeout": 0}, INVALID_ARGUMENT),
    ({"cmd": "drain", "wait": True, "timeout": "5m"}, INVALID_ARGUMENT),
    ({"cmd": "drain", "wait": True, "timeout": float("inf")}, INVALID_ARGUMENT),
    ({"cmd": "stop", "now": "yes"}, INVALID_ARGUMENT),
])
def test_invalid_requests(message: dict[str, Any], code: str) -> None:
    with pytest.raises(ControlError) as info:
        validate_request(message)
    assert info.value.code == code


def test_parse_request_decodes_then_validates() -> None:
    assert parse_request(b'{"cmd": "stop", "now": true}\n').args == {"now": True}
    with pytest.raises(ControlError) as info:
        parse_request(b"[" * 100_000)
    assert info.value.code == BAD_REQUEST


def test_request_message_leaves_out_none() -> None:
    assert protocol.request_message("drain", wait=True, timeout=None) == {
        "cmd": "drain", "wait": True}


# -- scale specs -----------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "current", "expected"), [
    ("8", 2, 8), (8, 2, 8), ("+2", 2, 4), ("-1", 2, 1), ("-2", 2, 0), ("0", 5, 0),
    (" +1", 0, 1), ("+0", 3, 3), (protocol.MAX_WORKERS, 1, protocol.MAX_WORKERS),
])
def test_resolve_workers(spec: int | str, current: int, expected: int) -> None:
    assert resolve_workers(spec, current) == expected


@pytest.mark.parametrize(("spec", "current"), [
    ("-3", 2), (-1, 2), ("abc", 2), ("1.5", 2), ("", 2), ("+", 2), (True, 2),
    (None, 2), (protocol.MAX_WORKERS + 1, 0), ("+1", protocol.MAX_WORKERS),
])
def test_resolve_workers_refuses(spec: Any, current: int) -> None:
    with pytest.raises(ControlError) as info:
        resolve_workers(spec, current)
    assert info.value.code == INVALID_ARGUMENT


def test_resolve_workers_honours_a_maximum() -> None:
    assert resolve_workers("+2", 2, maximum=4) == 4
    with pytest.raises(ControlError):
        resolve_workers("+3", 2, maximum=4)


# -- rendering -------------------------------------------------------------------------

T0 = datetime(2024, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
JOB_KEYS = {"id", "type", "queue", "state", "priority", "attempt", "max_attempts", "payload",
            "run_at", "created_at", "finished_at", "idempotency_key", "last_error"}
ATTEMPT_KEYS = {"attempt", "worker", "started_at", "finished_at", "outcome", "error"}


def record(**changes: Any) -> JobRecord:
    values: dict[str, Any] = dict(
        id=42, type="email", queue="default", state=JobState.FAILED, priority=1, attempt=2,
        max_attempts=2, payload={"to": "a@example.com"}, run_at=T0, created_at=T0,
        started_at=T0 + timedelta(seconds=1), finished_at=T0 + timedelta(seconds=2),
        idempotency_key="k-1", last_error="ValueError: bad [bold]address[/bold]",
        lease_owner="web-1/worker-1", attempts=(
            Attempt(1, "web-1/worker-1", T0, T0 + timedelta(seconds=1), "worker_died",
                    None, "worker exited with signal 9", None),
            Attempt(2, "web-1/worker-2", T0, T0 + timedelta(seconds=2), "error", "ValueError",
                    "bad [bold]address[/bold]",
                    "Traceback (most recent call last):\n  File \"jobs.py\", line 3\n"
                    "ValueError: bad address\n"),
        ))
    values.update(changes)
    return JobRecord(**values)


def sample_status() -> dict[str, Any]:
    """SPEC §9's status shape, as the daemon replies to `status`."""
    return {
        "master": {"pid": 4242, "state": "running", "uptime_s": 7384.2, "node_id": "web-1",
                   "version": "0.1.0"},
        "leader": {"node_id": "web-1", "term": 7, "is_me": True},
        "children": [
            {"role": "scheduler", "index": 0, "pid": 4243, "state": "idle", "job": None,
             "jobs_done": 0, "restarts": 0, "rss_bytes": 31457280},
            {"role": "worker", "index": 1, "pid": 4244, "state": "busy", "job": 123,
             "jobs_done": 57, "restarts": 1, "rss_bytes": 52428800},
            {"role": "worker", "index": 2, "pid": 4245, "state": "busy", "job": 124,
             "job_type": "email", "jobs_done": 3, "restarts": 0, "rss_bytes": 52428800},
            {"role": "worker", "index": 3, "pid": None, "state": "backoff", "job": None,
             "jobs_done": 0, "restarts": 5, "rss_bytes": None,
             "error": "ImportError: no module named 'myapp'"},
        ],
        "queues": [{"type": "email", "state": "available", "count": 12},
                   {"type": "report", "state": "failed", "count": 2}],
        "oldest_available_age_s": 3.5,
    }


def text_of(renderable: Any) -> str:
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_job_to_dict_has_the_spec_keys() -> None:
    job = serialize.job_to_dict(record())
    assert JOB_KEYS <= set(job)
    assert job["state"] == "failed"
    assert job["run_at"] == "2024-06-01T12:00:00+00:00"
    assert job["payload"] == {"to": "a@example.com"}
    assert [a["attempt"] for a in job["attempts"]] == [1, 2]
    assert all(ATTEMPT_KEYS <= set(a) for a in job["attempts"])
    assert job["attempts"][1]["error"] == "bad [bold]address[/bold]"
    assert job["attempts"][1]["error_class"] == "ValueError"
    assert job["attempts"][1]["traceback"].startswith("Traceback")
    json.dumps(job)  # JSON all the way down


def test_job_to_dict_leaves_attempts_out_of_lists() -> None:
    job = serialize.job_to_dict(record(attempts=None, finished_at=None, idempotency_key=None))
    assert "attempts" not in job
    assert job["finished_at"] is None and job["idempotency_key"] is None


def test_status_view_shows_master_children_and_queues() -> None:
    text = text_of(render.status_view(sample_status()))
    assert "pid 4242" in text and "running" in text and "up 2h 03m" in text
    assert "node web-1" in text and "this node (term 7)" in text
    for cell in ("scheduler", "worker", "4244", "busy", "backoff", "123", "57", "50.0 MiB",
                 "email#124", "worker 3: ImportError", "email", "available", "12", "report",
                 "failed"):
        assert cell in text, cell
    assert "3.5s" in text


def test_status_view_survives_missing_keys() -> None:
    text = text_of(render.status_view({"master": {"pid": 1}}))
    assert "pid 1" in text and "leader: none" in text and "no children" in text


def test_status_view_colours_states() -> None:
    console = Console(record=True, width=100, file=io.StringIO(), force_terminal=True,
                      color_system="standard")
    console.print(render.status_view(sample_status()))
    assert "\x1b[" in console.export_text(styles=True)


def test_jobs_table() -> None:
    jobs = [serialize.job_to_dict(record(attempts=None)),
            serialize.job_to_dict(record(id=43, state=JobState.AVAILABLE, last_error=None))]
    text = text_of(render.jobs_table(jobs))
    for cell in ("42", "43", "email", "failed", "available", "2/2", "ValueError"):
        assert cell in text, cell
    assert "[bold]" in text  # user data is shown as is, never as markup


def test_job_view_shows_attempts_and_tracebacks() -> None:
    text = text_of(render.job_view(serialize.job_to_dict(record())))
    for cell in ("42", "email", "failed", "2 of 2", '{"to": "a@example.com"}', "k-1",
                 "worker_died", "worker exited", "ValueError: bad", "[bold]address",
                 "attempt 2 traceback", 'File "jobs.py", line 3'):
        assert cell in text, cell


def test_job_view_without_attempts() -> None:
    text = text_of(render.job_view(serialize.job_to_dict(record(attempts=()))))
    assert "no attempts yet" in text


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (0, "0.0s"), (3.25, "3.2s"), (59.9, "59.9s"), (60, "1m 00s"),
    (427, "7m 07s"), (7384.2, "2h 03m"), (3 * 86400 + 4 * 3600, "3d 04h"), (-1, "0.0s"),
])
def test_format_duration(seconds: Any, text: str) -> None:
    assert render.format_duration(seconds) == text


@pytest.mark.parametrize(("count", "text"), [
    (None, "-"), (512, "512 B"), (2048, "2.0 KiB"), (52428800, "50.0 MiB"),
    (3 * 1024**3, "3.0 GiB"), (5 * 1024**4, "5120.0 GiB"),
])
def test_format_bytes(count: Any, text: str) -> None:
    assert render.format_bytes(count) == text


def test_format_time() -> None:
    assert render.format_time(None) == "-"
    local = T0.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    assert render.format_time(T0.isoformat()) == local
    assert render.format_time("garbage") == "garbage"
