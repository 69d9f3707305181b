"""The configuration's shape: one frozen dataclass per section, each field
at its built-in default (the one source of defaults: run_worker()'s
WorkerOptions takes its own from WorkerConfig)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from socket import gethostname
from typing import Any

from pulsed.jobs import DEFAULT_POISON_AFTER


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
MAX_DURATION_S = 100 * 365 * DAY  # any duration in the config; as a job's delay or timeout
DEFAULT_LISTEN = "127.0.0.1:8080"
LOG_FORMATS = ("plain", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
SMALLINT = (-32768, 32767)  # job priority is a PostgreSQL smallint
DEFAULT_CRON_TIMEZONE = "UTC"


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
    # "transaction": url is PgBouncer in transaction mode (docs/pgbouncer.md)
    pooler: str | None = None
    listen_url: str | None = None  # with pooler: direct, for LISTEN (None: poll)


@dataclass(frozen=True)
class DaemonConfig:
    """[daemon]: the master process, its state directory and control socket."""

    state_dir: Path = field(default_factory=default_state_dir)
    socket: Path | None = field(default_factory=default_socket)
    socket_group: str | None = None
    workers: int = DEFAULT_WORKERS  # with autoscale: its MIN, the count at start
    autoscale: WorkerRange | None = None  # workers = "MIN..MAX"
    scale_cooldown: float = 10.0  # autoscaling: no change this soon after the last
    scale_down_after: float = 60.0  # autoscaling: fewer workers after this long with none waiting
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    health_listen: str = "127.0.0.1:8081"  # `pulsed --role`: /healthz and /readyz
    node_id: str = field(default_factory=gethostname)
    log_format: str = "plain"
    log_level: str = "info"

    @property
    def socket_path(self) -> Path:
        return self.socket if self.socket is not None else self.state_dir / SOCKET_NAME


@dataclass(frozen=True)
class WorkerRange:
    """daemon.workers = "MIN..MAX": the master autoscales between them."""

    low: int
    high: int

    def __str__(self) -> str:
        return f"{self.low}..{self.high}"


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


@dataclass(frozen=True)
class OtelConfig:
    """[otel]: OpenTelemetry spans for each job attempt (pulsed.contrib.otel)."""

    enabled: bool = False  # needs the opentelemetry-api package: pulse-queue[otel]


_UNCONFIGURED_TYPE = TypeConfig()


@dataclass(frozen=True)
class Config:
    """The whole configuration; default_config() is Config()."""

    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    otel: OtelConfig = field(default_factory=OtelConfig)
    types: Mapping[str, TypeConfig] = field(default_factory=dict)
    cron: tuple[CronEntry, ...] = ()
    source: Path | None = None  # the file it came from; None: defaults only

    def type_config(self, job_type: str) -> TypeConfig:
        return self.types.get(job_type, _UNCONFIGURED_TYPE)
