"""Pulse's configuration: TOML -> frozen dataclasses, validated.

Precedence, lowest first: built-in defaults, the TOML file, then environment
variables named ``PULSE_<SECTION>_<KEY>`` (``PULSE_DAEMON_WORKERS=4``,
``PULSE_WORKER_HANDLERS=a.jobs,b.jobs``, ``PULSE_API_ENABLED=true``).
Every error is a ConfigError naming the key (or the variable) and the
problem, so ``pulsed --check-config`` can exit 78 with a useful message.

Only the prefixes PULSE_DATABASE_, PULSE_DAEMON_, PULSE_WORKER_,
PULSE_SCHEDULER_ and PULSE_API_ are configuration, and they are reserved: an
unknown key under them is an error, so a typo'd override fails loudly instead
of being ignored. Other PULSE_ variables (PULSE_TEST_DSN, ...) are not read.
Relative paths are kept relative (to the daemon's working directory), but
for worker.pythonpath: its relative directories are the config file's
(`import_path`).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from socket import gethostname
from typing import Any

import tomli_w

from pulsed.errors import ConfigError
from pulsed.jobs import DEFAULT_POISON_AFTER

# /etc/pulsed, not /etc/pulse: Debian's libpulse0 (PulseAudio) owns that;
# an /etc/pulse/pulse.toml from before the rename is still read, last.
DEFAULT_CONFIG_PATHS = (Path("pulse.toml"), Path("/etc/pulsed/pulse.toml"),
                        Path("/etc/pulse/pulse.toml"))
ROOT_STATE_DIR = Path("/var/lib/pulsed")  # systemd's StateDirectory=pulsed
ROOT_RUNTIME_DIR = Path("/run/pulsed")  # systemd's RuntimeDirectory=pulsed
SOCKET_NAME = "pulsed.sock"
DEFAULT_WORKERS = 2
DEFAULT_STOP_TIMEOUT = 30.0
DEFAULT_START_WAIT = 60.0  # pulsed retries an unreachable database this long at start
DEFAULT_LEASE_TTL = 30.0
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_HEARTBEAT_TIMEOUT = 30.0
# Jobs at once in one worker process: each is a thread or an asyncio task,
# and each running one is listed on the status board (pulsed/board.py).
MAX_CONCURRENCY = 256
# A handler's return value, as JSON, kept with its job (jobs' rows stay small
# enough to list and copy; a blob store is the place for more).
DEFAULT_MAX_RESULT_BYTES = 1 << 20
MAX_RESULT_BYTES = 64 << 20
DEFAULT_CANCEL_GRACE = 10.0  # job.cancelled turns true; this long later the handler is stopped
DEFAULT_LEADER_TTL = 15.0
DEFAULT_SCHEDULER_INTERVAL = 1.0
DAY = 86400.0
DEFAULT_LISTEN = "127.0.0.1:8080"
LOG_FORMATS = ("plain", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
SMALLINT = (-32768, 32767)  # job priority is a PostgreSQL smallint
DEFAULT_CRON_TIMEZONE = "UTC"

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")  # "ms" before "m"
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0,
               "minute": 60.0, "h": 3600.0, "hour": 3600.0}
_CRON_PART = re.compile(r"(?:\*|(\d+)(?:-(\d+))?)(?:/(\d+))?")
_CRON_RANGES = (("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31),
                ("month", 1, 12), ("day-of-week", 0, 7))  # 0 and 7 are Sunday
_MODULE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
# An allowed Host: a name or an IPv4 address, or an IPv6 one in brackets, with
# an optional :port; or "*" (any Host: only behind a proxy that checks it).
_HOST = re.compile(r"\*|(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
                   r"(?::\d{1,5})?")
_QUEUE = re.compile(r"\S+")
_ENV_TRUE, _ENV_FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    """$STATE_DIRECTORY (systemd's StateDirectory=), else /var/lib/pulsed for
    root, else $XDG_STATE_HOME/pulse or ~/.local/state/pulse."""
    env = os.environ if env is None else env
    systemd = _systemd_directory(env, "STATE_DIRECTORY")
    if systemd is not None:
        return systemd
    if os.geteuid() == 0:
        return ROOT_STATE_DIR
    xdg = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec says to ignore a relative value
        return Path(xdg) / "pulse"
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / ".local" / "state" / "pulse"


def default_socket(env: Mapping[str, str] | None = None) -> Path | None:
    """$RUNTIME_DIRECTORY/pulsed.sock under systemd (RuntimeDirectory=); for
    root, /run/pulsed/pulsed.sock while that directory exists (the service
    runs), so `sudo pulsectl status` finds the service's socket; else None:
    <state_dir>/pulsed.sock."""
    env = os.environ if env is None else env
    systemd = _systemd_directory(env, "RUNTIME_DIRECTORY")
    if systemd is not None:
        return systemd / SOCKET_NAME
    if os.geteuid() == 0 and ROOT_RUNTIME_DIR.is_dir():
        return ROOT_RUNTIME_DIR / SOCKET_NAME
    return None


def _systemd_directory(env: Mapping[str, str], variable: str) -> Path | None:
    """The first directory of a systemd *_DIRECTORY variable (a colon list)."""
    first = env.get(variable, "").split(":")[0]
    return Path(first) if os.path.isabs(first) else None


@dataclass(frozen=True)
class Rate:
    """At most ``count`` starts per ``per_seconds``: "100/m" is Rate(100, 60.0)."""

    count: int
    per_seconds: float


@dataclass(frozen=True)
class TypeConfig:
    """[types.<name>]: per job type overrides; None means "not configured"."""

    max_attempts: int | None = None
    timeout: float | None = None
    priority: int | None = None
    concurrency: int | None = None  # running at once, cluster-wide
    rate: Rate | None = None


@dataclass(frozen=True)
class CronEntry:
    """[[cron]]: a periodic job; exactly one of schedule (5-field cron) or every."""

    name: str
    type: str
    schedule: str | None = None
    every: float | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)
    queue: str = "default"
    priority: int = 0
    catch_up: bool = False
    timezone: str = DEFAULT_CRON_TIMEZONE  # an IANA name: the schedule's fields are its local time


@dataclass(frozen=True)
class DatabaseConfig:
    """[database]"""

    url: str | None = None  # None: the embedded PostgreSQL
    start_wait: float = DEFAULT_START_WAIT  # 0: try once


@dataclass(frozen=True)
class DaemonConfig:
    """[daemon]: the master process, its state directory and control socket."""

    state_dir: Path = field(default_factory=default_state_dir)
    socket: Path | None = field(default_factory=default_socket)
    socket_group: str | None = None
    workers: int = DEFAULT_WORKERS
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    node_id: str = field(default_factory=gethostname)
    log_format: str = "plain"
    log_level: str = "info"

    @property
    def socket_path(self) -> Path:
        return self.socket if self.socket is not None else self.state_dir / SOCKET_NAME


@dataclass(frozen=True)
class WorkerConfig:
    """[worker]: what each worker child imports, serves, and when it is recycled."""

    handlers: tuple[str, ...] = ()
    pythonpath: tuple[str, ...] = ()  # before the handlers import; see import_path()
    queues: tuple[str, ...] = ()  # empty: every queue
    concurrency: int = 1
    poison_after: int = DEFAULT_POISON_AFTER
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    cancel_grace: float = DEFAULT_CANCEL_GRACE
    prefetch: int = 500  # the most jobs one claim takes (sized down for long jobs)
    aging: float = 60.0  # a job waiting this long is claimed ahead of priority (0: off)
    max_jobs: int = 0  # 0: never recycle
    max_rss_mb: int = 0  # 0: never recycle
    lease_ttl: float = DEFAULT_LEASE_TTL
    poll_interval: float = DEFAULT_POLL_INTERVAL
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT


@dataclass(frozen=True)
class SchedulerConfig:
    """[scheduler]: leader election and the leader's periodic duties."""

    leader_ttl: float = DEFAULT_LEADER_TTL
    interval: float = DEFAULT_SCHEDULER_INTERVAL
    retention_completed: float = DAY
    retention_failed: float = 7 * DAY
    retention_cancelled: float = 7 * DAY
    vacuum_dead_rows: int = 50_000


@dataclass(frozen=True)
class ApiConfig:
    """[api]: the HTTP API and /metrics, on by default on loopback (SPEC §7)."""

    enabled: bool = True
    listen: str = DEFAULT_LISTEN
    token: str = ""
    # Named tokens ("name:secret"): any of them (or token) is accepted, and
    # actions (bulk retry, cancel, delete) are logged with the name.
    tokens: tuple[tuple[str, str], ...] = ()
    # Host headers served besides the listen address (and localhost, 127.0.0.1
    # and [::1] on loopback): the names clients use, e.g. behind a proxy.
    # DNS rebinding sends an attacker's name; it is refused.
    allowed_hosts: tuple[str, ...] = ()


_UNCONFIGURED_TYPE = TypeConfig()


@dataclass(frozen=True)
class Config:
    """The whole configuration; default_config() is Config()."""

    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    types: Mapping[str, TypeConfig] = field(default_factory=dict)
    cron: tuple[CronEntry, ...] = ()
    source: Path | None = None  # the file it came from; None: defaults only

    def type_config(self, job_type: str) -> TypeConfig:
        return self.types.get(job_type, _UNCONFIGURED_TYPE)


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


def _integer(low: int | None = None, high: int | None = None) -> Check:
    bound = (f" between {low} and {high}" if high is not None
             else f" >= {low}" if low is not None else "")

    def check(key: str, value: Any) -> int:
        # bool is an int subclass in Python; in TOML true is not a number.
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not is_int or (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(key, f"must be an integer{bound}, got {value!r}")
        return value
    return check


def _duration(*, zero_ok: bool = False) -> Check:
    bound = ">= 0" if zero_ok else "> 0"

    def check(key: str, value: Any) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError:
            seconds = -1.0
        if seconds < 0 or (seconds == 0 and not zero_ok):
            raise ConfigError(key, f"must be a duration {bound} (seconds, or a string like "
                                   f"'30s', '5m', '1h', '250ms'), got {value!r}")
        return seconds
    return check


def _string(*, empty_ok: bool = False) -> Check:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or not (empty_ok or value.strip()):
            what = "a string" if empty_ok else "a non-empty string"
            raise ConfigError(key, f"must be {what}, got {value!r}")
        return value
    return check


# Control characters (Unicode Cc): pulsed.api refuses them in a job's type,
# queue and idempotency key, which a cron entry's name, type and queue become.
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")


def _job_label(key: str, value: Any) -> str:
    text = _string()(key, value)
    if _CONTROL_CHARACTER.search(text):
        raise ConfigError(key, f"must not contain control characters (newline, tab, ...), "
                               f"got {value!r}")
    return text


def _choice(*options: str) -> Check:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, options))}, got {value!r}")
        return value.lower()
    return check


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def _path(key: str, value: Any) -> Path:
    return Path(_string()(key, value)).expanduser()


def _names(pattern: re.Pattern[str], what: str) -> Check:
    def check(key: str, value: Any) -> tuple[str, ...]:
        items = value if isinstance(value, (list, tuple)) else None
        if items is None or not all(isinstance(i, str) and pattern.fullmatch(i) for i in items):
            raise ConfigError(key, f"must be a list of {what}, got {value!r}")
        return tuple(items)
    return check


def _directories(key: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(i, str) and i.strip() and "\0" not in i
                                for i in items):
        raise ConfigError(key, f"must be a list of directories, got {value!r}")
    return tuple(items)


_TOKEN_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def _named_tokens(key: str, value: Any) -> tuple[tuple[str, str], ...]:
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


def _listen(key: str, value: Any) -> str:
    host, colon, port = _string()(key, value).rpartition(":")
    bare_ipv6 = ":" in host and not (host.startswith("[") and host.endswith("]"))
    if not colon or not host or bare_ipv6 or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(key, f"must be host:port with a port 1-65535, got {value!r}")
    return value


def _rate(key: str, value: Any) -> Rate:
    try:
        return parse_rate(value)
    except ValueError:
        problem = f"must be a rate like '100/m' (per s, m or h), got {value!r}"
        raise ConfigError(key, problem) from None


def _schedule(key: str, value: Any) -> str:
    fields = _string()(key, value).split()
    if len(fields) != len(_CRON_RANGES):
        raise ConfigError(key, f"must have 5 fields (minute hour day-of-month month "
                               f"day-of-week), got {len(fields)} in {value!r}")
    for text, (name, low, high) in zip(fields, _CRON_RANGES):
        if not all(_cron_part_ok(part, low, high) for part in text.split(",")):
            raise ConfigError(key, f"bad {name} field {text!r} in {value!r} (numbers {low}-{high}, "
                                   "'*', ranges a-b, lists a,b, steps */n or a-b/n)")
    return value


def _cron_part_ok(part: str, low: int, high: int) -> bool:
    match = _CRON_PART.fullmatch(part)
    if match is None:
        return False
    start, end, step = match.groups()
    if step is not None and (int(step) < 1 or (start is not None and end is None)):
        return False  # "*/0", and "5/10" (ambiguous between cron dialects)
    numbers = [int(n) for n in (start, end) if n is not None]
    return all(low <= n <= high for n in numbers) and numbers == sorted(numbers)


def _timezone(key: str, value: Any) -> str:
    """An IANA time zone name that zoneinfo knows (the system's tz
    database, else the tzdata package)."""
    name = _string()(key, value)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(key, f"must be an IANA time zone name like 'Europe/Berlin' or "
                               f"'UTC', got {value!r}") from None
    return name


def _json_table(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        try:
            json.dumps(dict(value))  # payloads are JSON; TOML dates and times are not
            return dict(value)
        except (TypeError, ValueError):
            pass
    raise ConfigError(key, f"must be a table of JSON values (no dates or times), got {value!r}")


# --- the schema: one table per section drives validation, env and rendering ---

@dataclass(frozen=True)
class _Field:
    kind: str  # how a PULSE_* variable's text is read: int, bool, list, optional, text, duration
    check: Check
    doc: str  # the comment in the rendered default config
    example: Any = None  # rendered commented out: the default is None or host-specific


_SECTIONS: dict[str, tuple[type, dict[str, _Field]]] = {
    "database": (DatabaseConfig, {
        "url": _Field("optional", _string(), "absent: a private embedded PostgreSQL",
                      "postgresql://pulse@localhost/pulse"),
        "start_wait": _Field("duration", _duration(zero_ok=True),
                             "at start, retry an unreachable database this long (0: once)"),
    }),
    "daemon": (DaemonConfig, {
        "state_dir": _Field("text", _path, "default: $STATE_DIRECTORY, /var/lib/pulsed "
                            "as root, else $XDG_STATE_HOME/pulse", str(ROOT_STATE_DIR)),
        "socket": _Field("optional", _path, "control socket; default "
                         "$RUNTIME_DIRECTORY/pulsed.sock, else <state_dir>/pulsed.sock",
                         "/run/pulsed/pulsed.sock"),
        "socket_group": _Field("optional", _string(), "group given the socket (mode 0660)",
                               "pulsed"),
        "workers": _Field("int", _integer(0), "worker processes"),
        "stop_timeout": _Field("duration", _duration(), "graceful stop: time left to running jobs"),
        "node_id": _Field("text", _string(), "default: the hostname", "web-1"),
        "log_format": _Field("text", _choice(*LOG_FORMATS), "plain or json (one object a line)"),
        "log_level": _Field("text", _choice(*LOG_LEVELS), "debug, info, warning or error"),
    }),
    "worker": (WorkerConfig, {
        "handlers": _Field("list", _names(_MODULE, "module names"),
                           "modules that register handlers"),
        "pythonpath": _Field("list", _directories, "more folders to import them from "
                             "(relative to this file's, which is searched too)"),
        "queues": _Field("list", _names(_QUEUE, "queue names"), "queues to serve; [] = all"),
        "concurrency": _Field("int", _integer(1, MAX_CONCURRENCY),
                              "jobs at once per worker process (threads / asyncio)"),
        "poison_after": _Field("int", _integer(1), "fail a job after this many "
                               "worker_died or timeout attempts in a row"),
        "max_result_bytes": _Field("int", _integer(1, MAX_RESULT_BYTES),
                                   "largest handler return value kept as the job's result"),
        "cancel_grace": _Field("duration", _duration(zero_ok=True),
                               "a cancelled job's handler is stopped this long after"),
        "prefetch": _Field("int", _integer(1), "most jobs one claim takes (adapts to job length)"),
        "aging": _Field("duration", _duration(zero_ok=True),
                        "a job waiting this long runs ahead of priority (0: off)"),
        "max_jobs": _Field("int", _integer(0), "recycle a worker after N jobs (0: never)"),
        "max_rss_mb": _Field("int", _integer(0), "recycle a worker above this RSS (0: never)"),
        "lease_ttl": _Field("duration", _duration(), "renewed while a job runs"),
        "poll_interval": _Field("duration", _duration(), "polling when LISTEN/NOTIFY is quiet"),
        "heartbeat_timeout": _Field("duration", _duration(),
                                    "the master kills a worker this silent"),
    }),
    "scheduler": (SchedulerConfig, {
        "leader_ttl": _Field("duration", _duration(), "a dead leader is replaced after this"),
        "interval": _Field("duration", _duration(), "scheduler tick; less than leader_ttl"),
        "retention_completed": _Field("duration", _duration(zero_ok=True), "then pruned"),
        "retention_failed": _Field("duration", _duration(zero_ok=True), "then pruned"),
        "retention_cancelled": _Field("duration", _duration(zero_ok=True), "then pruned"),
        "vacuum_dead_rows": _Field("int", _integer(0), "the leader VACUUMs pulse_jobs past "
                                   "this many dead rows (0: leave it to autovacuum)"),
    }),
    "api": (ApiConfig, {
        "enabled": _Field("bool", _bool, "the HTTP API and /metrics"),
        "listen": _Field("text", _listen, "host:port"),
        "token": _Field("text", _string(empty_ok=True), "bearer token; needed off loopback"),
        "allowed_hosts": _Field("list", _names(_HOST, "host or host:port names"),
                                "Host headers accepted besides the listen address"),
        "tokens": _Field("list", _named_tokens, "[\"name:secret\", ...]; actions are "
                         "logged with the name"),
    }),
}
_TYPE_CHECKS: dict[str, Check] = {
    "max_attempts": _integer(1), "timeout": _duration(), "priority": _integer(*SMALLINT),
    "concurrency": _integer(1), "rate": _rate,
}
_CRON_CHECKS: dict[str, Check] = {
    "name": _job_label, "type": _job_label, "schedule": _schedule, "every": _duration(),
    "payload": _json_table, "queue": _job_label, "priority": _integer(*SMALLINT),
    "catch_up": _bool, "timezone": _timezone,
}
_TOP_LEVEL = (*_SECTIONS, "types", "cron")


# --- parsing -----------------------------------------------------------------

def default_config() -> Config:
    """The built-in defaults: no file, no environment overrides."""
    return Config()


def parse_config(data: Mapping[str, Any], *, env: Mapping[str, str] | None = None,
                 source: Path | None = None) -> Config:
    """Validate parsed TOML (plus PULSE_* overrides from ``env``) into a Config."""
    env = os.environ if env is None else env
    _reject_unknown("", _table("", data), _TOP_LEVEL)
    overrides = _env_overrides(env)
    values = {name: _section(name, data, overrides.get(name, {})) for name in _SECTIONS}
    values["daemon"].setdefault("state_dir", default_state_dir(env))
    values["daemon"].setdefault("socket", default_socket(env))
    config = Config(**{name: cls(**values[name]) for name, (cls, _) in _SECTIONS.items()},
                    types=_types(data), cron=_cron(data), source=source)
    _check_consistency(config)
    return config


def _section(name: str, data: Mapping[str, Any], overrides: dict[str, tuple[str, Any]]
             ) -> dict[str, Any]:
    spec = _SECTIONS[name][1]
    table = _table(name, data.get(name, {}))
    _reject_unknown(name, table, spec)
    raw = {key: (f"{name}.{key}", value) for key, value in table.items()}
    raw.update(overrides)  # the environment wins over the file
    return {key: None if value is None else spec[key].check(label, value)
            for key, (label, value) in raw.items()}


def _types(data: Mapping[str, Any]) -> dict[str, TypeConfig]:
    result = {}
    for name, table in _table("types", data.get("types", {})).items():
        label = f"types.{name}"
        if not name.strip():
            raise ConfigError(label, "a job type name must not be empty")
        _reject_unknown(label, _table(label, table), _TYPE_CHECKS)
        result[name] = TypeConfig(**{key: _TYPE_CHECKS[key](f"{label}.{key}", value)
                                     for key, value in table.items()})
    return result


def _cron(data: Mapping[str, Any]) -> tuple[CronEntry, ...]:
    entries = data.get("cron", [])
    if not isinstance(entries, list):
        raise ConfigError("cron", "must be an array of tables ([[cron]] sections)")
    result: list[CronEntry] = []
    for index, table in enumerate(entries):
        entry = _cron_entry(f"cron[{index}]", table)
        if any(entry.name == seen.name for seen in result):
            raise ConfigError(f"cron[{index}].name", f"duplicate cron name {entry.name!r}")
        result.append(entry)
    return tuple(result)


def _cron_entry(label: str, table: Any) -> CronEntry:
    _reject_unknown(label, _table(label, table), _CRON_CHECKS)
    for key in ("name", "type"):
        if key not in table:
            raise ConfigError(f"{label}.{key}", "is required")
    if ("schedule" in table) == ("every" in table):
        raise ConfigError(label, "needs exactly one of 'schedule' (cron syntax) "
                                 "or 'every' (a duration)")
    if "timezone" in table and "every" in table:  # an interval has no local time
        raise ConfigError(f"{label}.timezone", "applies to 'schedule' only, not 'every'")
    return CronEntry(**{key: _CRON_CHECKS[key](f"{label}.{key}", value)
                        for key, value in table.items()})


def import_path(config: Config) -> tuple[str, ...]:
    """The directories a worker puts in front of sys.path before it imports
    the handler modules: worker.pythonpath (relative ones taken from the
    config file's folder, as gunicorn's --pythonpath from its working
    directory), then that folder itself, so that handlers = ["myjobs"] finds
    myjobs.py beside pulse.toml. The `pulsed` script's sys.path holds
    neither its working directory nor the config's."""
    base = config.source.parent if config.source is not None else Path.cwd()
    found = [base / Path(entry).expanduser() for entry in config.worker.pythonpath]
    if config.source is not None:
        found.append(config.source.parent)
    return tuple(dict.fromkeys(os.path.normpath(entry) for entry in found))


def _check_consistency(config: Config) -> None:
    scheduler, api = config.scheduler, config.api
    if scheduler.interval >= scheduler.leader_ttl:  # the leader renews once a tick
        raise ConfigError("scheduler.interval", f"must be less than scheduler.leader_ttl "
                          f"({scheduler.leader_ttl:g}s), got {scheduler.interval:g}s")
    if api.enabled and not (api.token or api.tokens) and not _is_loopback(api.listen):
        raise ConfigError("api.token", f"must be set when api.listen ({api.listen!r}) "
                          "is not a loopback address")


def _is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _table(label: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(label or "<top level>", f"must be a table, got {value!r}")
    return value


def _reject_unknown(prefix: str, table: Mapping[str, Any],
                    known: Mapping[str, Any] | tuple[str, ...]) -> None:
    for key in table:
        if key not in known:
            label = f"{prefix}.{key}" if prefix else key
            choices = [f"{prefix}.{k}" if prefix else k for k in known]
            raise ConfigError(label, "unknown key" + _did_you_mean(label, choices))


def _did_you_mean(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


# --- environment -------------------------------------------------------------

def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, tuple[str, Any]]]:
    """{section: {key: (variable, value)}} from PULSE_<SECTION>_<KEY> variables."""
    result: dict[str, dict[str, tuple[str, Any]]] = {}
    for variable, text in env.items():
        section, underscore, key = variable.removeprefix("PULSE_").lower().partition("_")
        if not variable.startswith("PULSE_") or not underscore or section not in _SECTIONS:
            continue  # not configuration (PULSE_TEST_DSN, ...)
        spec = _SECTIONS[section][1]
        if key not in spec:
            known = [f"PULSE_{section}_{k}".upper() for k in spec]
            raise ConfigError(variable, "unknown setting" + _did_you_mean(variable, known))
        result.setdefault(section, {})[key] = (variable, _from_env(spec[key].kind, text))
    return result


def _from_env(kind: str, text: str) -> Any:
    """A variable's text as the TOML value it stands for; the same checks then run."""
    word = text.strip()
    if kind == "int" and re.fullmatch(r"[+-]?\d+", word):
        return int(word)
    if kind == "bool" and word.lower() in _ENV_TRUE + _ENV_FALSE:
        return word.lower() in _ENV_TRUE
    if kind == "list":  # comma-separated; empty means an empty list
        return [item.strip() for item in text.split(",") if item.strip()]
    if kind == "optional" and not word:
        return None  # an empty variable unsets the key (e.g. back to embedded)
    return text


# --- files -------------------------------------------------------------------

def load_config(path: str | os.PathLike[str] | None = None, *,
                env: Mapping[str, str] | None = None) -> Config:
    """Load ``path``, else ./pulse.toml, else /etc/pulsed/pulse.toml (then the
    old /etc/pulse/pulse.toml), else the defaults."""
    file = _find_file(path)
    if file is None:
        return parse_config({}, env=env)
    return parse_config(_read_toml(file), env=env, source=file)


def _find_file(path: str | os.PathLike[str] | None) -> Path | None:
    if path is not None:
        file = Path(path).expanduser()
        if not file.exists():
            raise ConfigError(str(path), "file not found")
        return file.absolute()  # absolute: a reload (HUP) must find it again
    return next((p.absolute() for p in DEFAULT_CONFIG_PATHS if p.is_file()), None)


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        with file.open("rb") as stream:
            return tomllib.load(stream)
    except OSError as exc:
        raise ConfigError(str(file), f"cannot read: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(file), f"invalid TOML: {exc}") from exc
    except RecursionError:
        raise ConfigError(str(file), "invalid TOML: arrays or tables nested too deeply") from None


# --- the commented default config (`pulsectl config init`) -------------------

_RENDER_HEADER = """\
# Pulse configuration. Every key is optional; the values shown are the defaults.
# Durations are seconds or strings like "30s", "5m", "1h", "1d", "250ms".
# PULSE_<SECTION>_<KEY> environment variables override this file,
# e.g. PULSE_DATABASE_URL, PULSE_DAEMON_WORKERS=4, PULSE_WORKER_HANDLERS=a.jobs,b.jobs"""

_RENDER_EXAMPLES = """
# Per job type settings, all optional:
# [types.email]
# max_attempts = 5        # attempts before the job fails
# timeout = "30s"         # a running attempt is stopped after this
# priority = 0            # default priority, lower runs first (-32768..32767)
# concurrency = 10        # at most this many running, cluster-wide
# rate = "100/m"          # at most this many starts per s, m or h

# Periodic jobs, enqueued once per due time by the leader:
# [[cron]]
# name = "nightly-report" # unique
# type = "report"
# schedule = "0 3 * * *"  # minute hour day-of-month month day-of-week; or every = "10m"
# payload = {}
# queue = "default"
# priority = 0
# catch_up = false        # true: enqueue runs missed while no leader was up
# timezone = "UTC"        # the schedule's local time (an IANA name: "Europe/Berlin")
# Daylight saving as cron: a time skipped in spring runs at the next minute, one
# repeated in autumn runs once (a "*" minute or hour keeps its pace through both)."""


def render_default_config() -> str:
    """Commented TOML with every key at its default; it loads back as default_config()."""
    defaults = default_config()
    lines = [_RENDER_HEADER]
    for name, (_, spec) in _SECTIONS.items():
        lines += ["", f"[{name}]"]
        section = getattr(defaults, name)
        lines += [_render_key(key, field_, getattr(section, key)) for key, field_ in spec.items()]
    return "\n".join(lines) + "\n" + _RENDER_EXAMPLES + "\n"


def _render_key(key: str, field_: _Field, default: Any) -> str:
    if field_.example is not None:  # None or host-specific: show, but leave unset
        pair = "# " + tomli_w.dumps({key: field_.example}).strip()
    else:
        value = _format_duration(default) if field_.kind == "duration" else default
        pair = tomli_w.dumps({key: list(value) if isinstance(value, tuple) else value}).strip()
    return f"{pair:<40} # {field_.doc}"


def _format_duration(seconds: float) -> str | float:
    for unit in ("d", "h", "m", "s", "ms"):
        count = seconds / _DURATION_UNITS[unit]
        if count >= 1 and count == round(count):
            return f"{round(count)}{unit}"
    return seconds
