"""Configuration values: durations and rates from their text, and the
checks that turn a raw value into a typed one or a ConfigError naming its key."""

from __future__ import annotations

import json
import math
import re
import zoneinfo
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pulsed.config_model import DAY, MAX_DURATION_S, Rate, WorkerRange
from pulsed.cron import CronExpression, CronSyntaxError
from pulsed.errors import ConfigError


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")  # "ms" before "m"
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0,
               "minute": 60.0, "h": 3600.0, "hour": 3600.0}


# --- values ------------------------------------------------------------------

def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "30s", "5m", "1h30m", "250ms"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and _NUMBER.fullmatch(text := value.replace(" ", "")):
        seconds = float(text)
    elif isinstance(value, str) and _DURATION.fullmatch(text):
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
    else:
        raise ValueError(f"not a duration: {value!r}")
    if not math.isfinite(seconds) or seconds < 0:  # TOML allows inf and nan
        raise ValueError(f"not a duration: {value!r}")
    return seconds


def parse_rate(value: object) -> Rate:
    """A Rate from "COUNT/UNIT" (s, m, h, sec, min, hour) or "COUNT/DURATION" ("10/5s")."""
    if not isinstance(value, str):
        raise ValueError(f"not a rate: {value!r}")
    count, slash, per = value.replace(" ", "").partition("/")
    if not slash or not count.isdigit() or int(count) < 1:
        raise ValueError(f"not a rate: {value!r}")
    seconds = _RATE_UNITS.get(per) or parse_duration(per)
    if seconds <= 0:
        raise ValueError(f"not a rate: {value!r}")
    return Rate(int(count), seconds)


# --- checks: (key, raw value) -> typed value, or ConfigError naming the key ---

Check = Callable[[str, Any], Any]


def check_integer(low: int | None = None, high: int | None = None, *, limit: str = "") -> Check:
    """`limit` says what the upper bound is, for the error message."""
    bound = (f" between {low} and {high}" if high is not None
             else f" >= {low}" if low is not None else "")
    bound += f" ({limit})" if limit else ""

    def check(key: str, value: Any) -> int:
        # bool is an int subclass in Python; in TOML true is not a number.
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not is_int or (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(key, f"must be an integer{bound}, got {value!r}")
        return value
    return check


_WORKER_RANGE = re.compile(r"\s*([0-9]+)\s*\.\.\s*([0-9]+)\s*")


def check_workers(high: int, limit: str) -> Check:
    """A worker count (0..high), or "MIN..MAX" for the master to autoscale within."""
    count = check_integer(0, high, limit=limit)

    def check(key: str, value: Any) -> int | WorkerRange:
        if not isinstance(value, str):
            return count(key, value)
        match = _WORKER_RANGE.fullmatch(value)
        if match is None:
            raise ConfigError(key, f"must be a number of workers or a range 'MIN..MAX' "
                                   f"(e.g. '2..16'), got {value!r}")
        low, top = int(match[1]), int(match[2])
        if low > top or top < 1 or top > high:
            raise ConfigError(key, f"the range {value!r} must have MIN <= MAX, MAX >= 1 and "
                                   f"MAX <= {high} ({limit})")
        return WorkerRange(low, top)
    return check


_TOKEN_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def check_named_tokens(key: str, value: Any) -> tuple[tuple[str, str], ...]:
    """["alice:secret", ...] (or a table {alice = "secret"}) ->
    (("alice", "secret"), ...); names unique."""
    if isinstance(value, Mapping):
        value = [f"{name}:{secret}" if isinstance(secret, str) else None
                 for name, secret in value.items()]
    items = value if isinstance(value, (list, tuple)) else None
    if items is None:
        raise ConfigError(key, f"must be a list of \"name:secret\" strings, got {value!r}")
    pairs: dict[str, str] = {}
    for item in items:
        name, colon, secret = item.partition(":") if isinstance(item, str) else ("", "", "")
        if not colon or not _TOKEN_NAME.fullmatch(name) or not secret.strip():
            raise ConfigError(key, f"each entry must be \"name:secret\" (name: letters, "
                              f"digits, _ . @ -; secret not empty), got {item!r}")
        if name in pairs:
            raise ConfigError(key, f"the token name {name!r} is given twice")
        pairs[name] = secret
    return tuple(pairs.items())


def check_duration(*, zero_ok: bool = False, minimum: float = 0.0) -> Check:
    """Seconds, at most MAX_DURATION_S: beyond it a value is a typo, and
    one like 1e300 overflowed where it was used (an interval in SQL, a
    timestamp in Python), on every use instead of at load."""
    bound = f">= {minimum:g} s" if minimum else ">= 0" if zero_ok else "> 0"
    bound += " and at most 100 years"

    def check(key: str, value: Any) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError:
            seconds = -1.0
        if (seconds < minimum or seconds < 0 or (seconds == 0 and not zero_ok)
                or seconds > MAX_DURATION_S):
            raise ConfigError(key, f"must be a duration {bound} (seconds, or a string like "
                                   f"'30s', '5m', '1h', '250ms'), got {value!r}")
        return seconds
    return check


def check_string(*, empty_ok: bool = False) -> Check:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or not (empty_ok or value.strip()):
            what = "a string" if empty_ok else "a non-empty string"
            raise ConfigError(key, f"must be {what}, got {value!r}")
        return value
    return check


# Control characters (Unicode Cc): pulsed.api refuses them in a job's type,
# queue and idempotency key, which a cron entry's name, type and queue become.
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")


def check_job_label(key: str, value: Any) -> str:
    text = check_string()(key, value)
    if _CONTROL_CHARACTER.search(text):
        raise ConfigError(key, f"must not contain control characters (newline, tab, ...), "
                               f"got {value!r}")
    return text


def check_choice(*options: str) -> Check:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, options))}, got {value!r}")
        return value.lower()
    return check


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def check_path(key: str, value: Any) -> Path:
    return Path(check_string()(key, value)).expanduser()


def check_names(pattern: re.Pattern[str], what: str) -> Check:
    def check(key: str, value: Any) -> tuple[str, ...]:
        items = value if isinstance(value, (list, tuple)) else None
        if items is None or not all(isinstance(i, str) and pattern.fullmatch(i) for i in items):
            raise ConfigError(key, f"must be a list of {what}, got {value!r}")
        return tuple(items)
    return check


def check_directories(key: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(i, str) and i.strip() and "\0" not in i
                                for i in items):
        raise ConfigError(key, f"must be a list of directories, got {value!r}")
    return tuple(items)


def check_listen(key: str, value: Any) -> str:
    host, colon, port = check_string()(key, value).rpartition(":")
    bare_ipv6 = ":" in host and not (host.startswith("[") and host.endswith("]"))
    if not colon or not host or bare_ipv6 or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(key, f"must be host:port with a port 1-65535, got {value!r}")
    return value


def check_rate(key: str, value: Any) -> Rate:
    try:
        return parse_rate(value)
    except ValueError:
        problem = f"must be a rate like '100/m' (per s, m or h), got {value!r}"
        raise ConfigError(key, problem) from None


def check_schedule(key: str, value: Any) -> str:
    try:
        CronExpression.parse(check_string()(key, value))  # the scheduler's own parser
    except CronSyntaxError as exc:
        raise ConfigError(key, str(exc)) from None
    return value


def check_timezone(key: str, value: Any) -> str:
    """An IANA time zone name that zoneinfo knows (the system's tz
    database, else the tzdata package)."""
    name = check_string()(key, value)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(key, f"must be an IANA time zone name like 'Europe/Berlin' or "
                               f"'UTC', got {value!r}") from None
    return name


def check_json_table(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        try:
            json.dumps(dict(value))  # payloads are JSON; TOML dates and times are not
            return dict(value)
        except (TypeError, ValueError):
            pass
    raise ConfigError(key, f"must be a table of JSON values (no dates or times), got {value!r}")
