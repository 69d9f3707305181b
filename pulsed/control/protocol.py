"""The control protocol: one JSON object per line, each way (SPEC §6).

A request is ``{"cmd": "status"}`` or ``{"cmd": "scale", "workers": "+2"}``;
a reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": {"code": ...,
"message": ...}}``. Lines are UTF-8 and end with ``\\n``; the server refuses
a line longer than its cap. ``hello`` returns PROTOCOL_VERSION, which grows
only when a change would break an existing client.

This module is pure: framing, the command table (which commands exist, which
write, which arguments each takes) and the stable error codes. The server
and the client both use it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pulsed.board import MAX_SLOTS, MAX_WORKERS
from pulsed.errors import PulseError

PROTOCOL_VERSION = 1
MAX_LINE = 64 * 1024  # bytes in one request line, newline excluded
MAX_CHILD_INDEX = MAX_SLOTS  # no child's index reaches past the board's slots
ROLES = ("worker", "scheduler", "api")  # the children `restart` and `logs` name
MAX_LOG_LINES = 1000  # the most lines one `logs` reply carries (a place's whole ring)
DEFAULT_LOG_LINES = 100

# Error codes: stable, scripts may depend on them (add, never rename).
BAD_REQUEST = "bad_request"  # not a JSON object on one line, or too long
UNKNOWN_COMMAND = "unknown_command"
INVALID_ARGUMENT = "invalid_argument"
FORBIDDEN = "forbidden"  # the peer's uid/group may not use the socket
SHUTTING_DOWN = "shutting_down"  # the daemon is stopping: no write commands but stop --now
TIMEOUT = "timeout"  # a wait (drain --wait) ran out of time
BUSY = "busy"  # too many control connections at once; try again
FAILED = "failed"  # the daemon could not do it (say, reload found a bad config)
INTERNAL = "internal"  # a bug in the daemon; its log has the traceback
ERROR_CODES = frozenset({BAD_REQUEST, UNKNOWN_COMMAND, INVALID_ARGUMENT, FORBIDDEN,
                         SHUTTING_DOWN, TIMEOUT, BUSY, FAILED, INTERNAL})

_WORKERS_SPEC = re.compile(r"([+-]?)([0-9]{1,9})")  # ASCII digits only


class ControlError(PulseError):
    """A control request failed."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{message} ({code})")


# -- framing --------------------------------------------------------------------


def encode(message: Mapping[str, Any]) -> bytes:
    """One message as a line: compact JSON, ASCII-only, ``\\n``-terminated.

    Raises ValueError or TypeError for what JSON cannot carry (NaN, sets, ...).
    """
    text = json.dumps(message, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    return text.encode("ascii") + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One line (without or with its newline) as a JSON object.

    Anything else, however malformed, raises ControlError(BAD_REQUEST).
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlError(BAD_REQUEST, "the line is not valid UTF-8") from None
    try:
        message = json.loads(text)
    except RecursionError:
        raise ControlError(BAD_REQUEST, "the JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and huge integers
        raise ControlError(BAD_REQUEST, f"not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ControlError(BAD_REQUEST, f"expected a JSON object, got {_json_kind(message)}")
    return message


def ok_reply(result: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"ok": True, **{k: v for k, v in (result or {}).items() if k != "ok"}}


def error_reply(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


def reply_result(reply: Any) -> dict[str, Any]:
    """A reply's result without the ``ok`` envelope; ControlError if it failed."""
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ControlError(BAD_REQUEST, "the reply is not a protocol reply")
    if not reply["ok"]:
        error = reply.get("error")
        error = error if isinstance(error, dict) else {}
        code, message = error.get("code"), error.get("message")
        raise ControlError(code if isinstance(code, str) else INTERNAL,
                           message if isinstance(message, str) else "request failed")
    return {key: value for key, value in reply.items() if key != "ok"}


# -- requests -------------------------------------------------------------------

Check = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Command:
    """A command the daemon understands: whether it changes anything, and its arguments."""

    name: str
    writes: bool
    args: Mapping[str, tuple[Check, Any]] = field(default_factory=dict)  # name -> (check, default)
    help: str = ""


@dataclass(frozen=True)
class Request:
    command: Command
    args: Mapping[str, Any]

    @property
    def cmd(self) -> str:
        return self.command.name


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ControlError(INVALID_ARGUMENT, f"{name} must be true or false, got {_json_kind(value)}")
    return value


def _seconds_or_none(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ControlError(INVALID_ARGUMENT, f"{name} must be a number of seconds > 0, "
                                             f"got {value!r}")
    return float(value)


def _workers(name: str, value: Any) -> int | str:
    """N, +N, -N or auto; an N above MAX_WORKERS is refused here (a relative
    change is checked against the current count by resolve_workers)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _at_most_max_workers(name, value, value)
    if isinstance(value, str) and value.strip() == "auto":
        return "auto"
    match = _WORKERS_SPEC.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is not None:
        sign, number = match.groups()
        return value.strip() if sign else _at_most_max_workers(name, int(number), value.strip())
    raise ControlError(INVALID_ARGUMENT, f"{name} must be N, +N, -N or auto (an integer or a "
                                         f"string like '8', '+2', '-1', 'auto'), got {value!r}")


_WORKERS_LIMIT = " (the most worker processes one pulsed runs)"


def _at_most_max_workers(name: str, count: int, spec: int | str) -> int | str:
    if count > MAX_WORKERS:
        raise ControlError(INVALID_ARGUMENT, f"{name} must be at most {MAX_WORKERS}"
                                             f"{_WORKERS_LIMIT}, got {spec!r}")
    return spec


def _role(name: str, value: Any) -> str:
    if value not in ROLES:
        raise ControlError(INVALID_ARGUMENT, f"{name} must be one of {', '.join(ROLES)}, "
                                             f"got {value!r}")
    return value


def _role_or_none(name: str, value: Any) -> str | None:
    return None if value is None else _role(name, value)


def _count(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ControlError(INVALID_ARGUMENT, f"{name} must be an integer in {low}..{high}, "
                                             f"got {value!r}")
    return value


def _index_or_none(name: str, value: Any) -> int | None:
    return None if value is None else _index(name, value)


def _index(name: str, value: Any) -> int:
    return _count(name, value, 0, MAX_CHILD_INDEX)


def _log_lines(name: str, value: Any) -> int:
    return _count(name, value, 0, MAX_LOG_LINES)


def _seq_or_none(name: str, value: Any) -> int | None:
    return None if value is None else _count(name, value, 0, 2 ** 62)


_REQUIRED = object()

# Read commands only look; write commands change the daemon and are refused
# while it stops.
COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("hello", writes=False, help="the protocol version and the daemon's version"),
    Command("status", writes=False, help="master, leader, children and queues (SPEC §9)"),
    Command("scale", writes=True, args={"workers": (_workers, _REQUIRED)},
            help="set the worker count: N, +N or -N (pinned while autoscaling), or auto"),
    Command("drain", writes=True,
            args={"wait": (_bool, False), "timeout": (_seconds_or_none, None)},
            help="claim nothing new; with wait, reply once no job runs on this node"),
    Command("resume", writes=True, help="undo drain"),
    Command("reload", writes=True, help="reload the config and replace workers gracefully"),
    Command("stop", writes=True, args={"now": (_bool, False)},
            help="graceful stop, or with now a fast one"),
    Command("restart", writes=True, args={"role": (_role, _REQUIRED), "index": (_index, 0)},
            help="replace one child gracefully (its jobs finish first, up to stop_timeout)"),
    Command("logs", writes=False,
            args={"role": (_role_or_none, None), "index": (_index_or_none, None),
                  "lines": (_log_lines, DEFAULT_LOG_LINES), "after": (_seq_or_none, None)},
            help="children's recent stderr lines from the master's ring; after: newer "
                 "than this seq (to follow)"),
)}


def parse_request(line: bytes) -> Request:
    """Decode and validate one request line; ControlError says what is wrong."""
    return validate_request(decode(line))


def validate_request(message: Mapping[str, Any]) -> Request:
    cmd = message.get("cmd")
    if not isinstance(cmd, str):
        raise ControlError(BAD_REQUEST, "a request needs \"cmd\": a string naming the command")
    command = COMMANDS.get(cmd)
    if command is None:
        known = ", ".join(COMMANDS)
        raise ControlError(UNKNOWN_COMMAND, f"unknown command {cmd[:64]!r} (known: {known})")
    unknown = [key for key in message if key != "cmd" and key not in command.args]
    if unknown:
        raise ControlError(INVALID_ARGUMENT,
                           f"{cmd} takes no argument {unknown[0][:64]!r}"
                           + (f" (it takes: {', '.join(command.args)})" if command.args else ""))
    args = {}
    for name, (check, default) in command.args.items():
        if name in message:
            args[name] = check(name, message[name])
        elif default is _REQUIRED:
            raise ControlError(INVALID_ARGUMENT, f"{cmd} needs the argument {name!r}")
        else:
            args[name] = default
    return Request(command, args)


def request_message(cmd: str, **args: Any) -> dict[str, Any]:
    """The message for a request (arguments left out when None)."""
    return {"cmd": cmd, **{key: value for key, value in args.items() if value is not None}}


# -- scale ----------------------------------------------------------------------


def resolve_workers(spec: int | str, current: int, *, maximum: int = MAX_WORKERS) -> int:
    """The new worker count for ``scale``: "8" or 8 sets it, "+2" / "-1" change it.

    Raises ControlError(INVALID_ARGUMENT) for a malformed spec or a result
    outside 0..maximum.
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        target = spec
    else:
        match = _WORKERS_SPEC.fullmatch(spec.strip()) if isinstance(spec, str) else None
        if match is None:
            raise ControlError(INVALID_ARGUMENT, f"workers must be N, +N or -N, got {spec!r}")
        sign, number = match.groups()
        target = current + int(number) if sign == "+" else \
            current - int(number) if sign == "-" else int(number)
    if not 0 <= target <= maximum:
        raise ControlError(INVALID_ARGUMENT, f"workers would be {target} (from {current} "
                                             f"with {spec!r}); it must be 0..{maximum}"
                                             + _WORKERS_LIMIT * (maximum == MAX_WORKERS))
    return target


def _json_kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
