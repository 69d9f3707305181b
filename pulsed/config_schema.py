"""The schema: one table per section (its dataclass, each key's kind, check
and comment) drives validation, environment overrides and rendering."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pulsed.board import MAX_WORKERS
from pulsed.config_model import (LOG_FORMATS, LOG_LEVELS, MAX_CONCURRENCY, MAX_RESULT_BYTES,
                                 ROOT_STATE_DIR, SMALLINT, ApiConfig, DaemonConfig,
                                 DatabaseConfig, OtelConfig, SchedulerConfig, WorkerConfig)
from pulsed.config_values import (Check, check_bool, check_choice, check_directories,
                                  check_duration, check_integer, check_job_label,
                                  check_json_table, check_listen, check_names, check_path,
                                  check_rate, check_schedule, check_string, check_timezone,
                                  check_named_tokens, check_workers)


_MODULE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
# An allowed Host: a name or an IPv4 address, or an IPv6 one in brackets, with
# an optional :port; or "*" (any Host: only behind a proxy that checks it).
_HOST = re.compile(r"\*|(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
                   r"(?::\d{1,5})?")
_QUEUE = re.compile(r"\S+")


# --- the schema: one table per section drives validation, env and rendering ---

@dataclass(frozen=True)
class _Field:
    kind: str  # how a PULSE_* variable's text is read: int, bool, list, optional, text, duration
    check: Check
    doc: str  # the comment in the rendered default config
    example: Any = None  # rendered commented out: the default is None or host-specific


_SECTIONS: dict[str, tuple[type, dict[str, _Field]]] = {
    "database": (DatabaseConfig, {
        "url": _Field("optional", check_string(), "absent: a private embedded PostgreSQL",
                      "postgresql://pulse@localhost/pulse"),
        "start_wait": _Field("duration", check_duration(zero_ok=True),
                             "at start, retry an unreachable database this long (0: once)"),
        "pooler": _Field("optional", check_choice("transaction"),
                         "url is PgBouncer in this pool mode (no session state used)",
                         "transaction"),
        "listen_url": _Field("optional", check_string(), "with pooler: a direct URL for LISTEN "
                             "(absent: workers poll)", "postgresql://pulse@db-primary/pulse"),
    }),
    "daemon": (DaemonConfig, {
        "state_dir": _Field("text", check_path, "default: $STATE_DIRECTORY, /var/lib/pulsed "
                            "as root, else $XDG_STATE_HOME/pulse", str(ROOT_STATE_DIR)),
        "socket": _Field("optional", check_path, "control socket; default "
                         "$RUNTIME_DIRECTORY/pulsed.sock, else <state_dir>/pulsed.sock",
                         "/run/pulsed/pulsed.sock"),
        "socket_group": _Field("optional", check_string(), "group given the socket (mode 0660)",
                               "pulsed"),
        "workers": _Field("int", check_workers(MAX_WORKERS, "the most worker processes one "
                                                            "pulsed runs"),
                          "worker processes: N, or 'MIN..MAX' to autoscale"),
        "scale_cooldown": _Field("duration", check_duration(),
                                 "autoscaling: no change this soon after the last one"),
        "scale_down_after": _Field("duration", check_duration(),
                                   "autoscaling: fewer workers after this long with no job waiting"),
        "stop_timeout": _Field("duration", check_duration(), "graceful stop: time left to running jobs"),
        "health_listen": _Field("text", check_listen, "pulsed --role worker|scheduler: host:port "
                                "of /healthz and /readyz (0.0.0.0:8081 in a container)"),
        "node_id": _Field("text", check_string(), "default: the hostname", "web-1"),
        "log_format": _Field("text", check_choice(*LOG_FORMATS), "plain or json (one object a line)"),
        "log_level": _Field("text", check_choice(*LOG_LEVELS), "debug, info, warning or error"),
    }),
    "worker": (WorkerConfig, {
        "handlers": _Field("list", check_names(_MODULE, "module names"),
                           "modules that register handlers"),
        "pythonpath": _Field("list", check_directories, "more folders to import them from "
                             "(relative to this file's, which is searched too)"),
        "queues": _Field("list", check_names(_QUEUE, "queue names"), "queues to serve; [] = all"),
        "concurrency": _Field("int", check_integer(1, MAX_CONCURRENCY),
                              "jobs at once per worker process (threads / asyncio)"),
        "poison_after": _Field("int", check_integer(1), "fail a job after this many "
                               "worker_died or timeout attempts in a row"),
        "max_result_bytes": _Field("int", check_integer(1, MAX_RESULT_BYTES),
                                   "largest handler return value kept as the job's result"),
        "cancel_grace": _Field("duration", check_duration(zero_ok=True),
                               "a cancelled job's handler is stopped this long after"),
        "prefetch": _Field("int", check_integer(1), "most jobs one claim takes (adapts to job length)"),
        "aging": _Field("duration", check_duration(zero_ok=True),
                        "a job waiting this long runs ahead of priority (0: off)"),
        "max_jobs": _Field("int", check_integer(0), "recycle a worker after N jobs (0: never)"),
        "max_rss_mb": _Field("int", check_integer(0), "recycle a worker above this RSS (0: never)"),
        "lease_ttl": _Field("duration", check_duration(), "renewed while a job runs"),
        "poll_interval": _Field("duration", check_duration(), "polling when LISTEN/NOTIFY is quiet"),
        "heartbeat_timeout": _Field("duration", check_duration(),
                                    "the master kills a worker this silent"),
    }),
    "scheduler": (SchedulerConfig, {
        "leader_ttl": _Field("duration", check_duration(), "a dead leader is replaced after this"),
        "interval": _Field("duration", check_duration(), "scheduler tick; less than leader_ttl"),
        "retention_completed": _Field("duration", check_duration(zero_ok=True), "then pruned"),
        "retention_failed": _Field("duration", check_duration(zero_ok=True), "then pruned"),
        "retention_cancelled": _Field("duration", check_duration(zero_ok=True), "then pruned"),
        "vacuum_dead_rows": _Field("int", check_integer(0), "the leader VACUUMs pulse_jobs past "
                                   "this many dead rows (0: leave it to autovacuum)"),
    }),
    "api": (ApiConfig, {
        "enabled": _Field("bool", check_bool, "the HTTP API and /metrics"),
        "listen": _Field("text", check_listen, "host:port"),
        "token": _Field("text", check_string(empty_ok=True), "bearer token; needed off loopback"),
        "allowed_hosts": _Field("list", check_names(_HOST, "host or host:port names"),
                                "Host headers accepted besides the listen address"),
        "tokens": _Field("list", check_named_tokens, "[\"name:secret\", ...]; actions are "
                         "logged with the name"),
    }),
    "otel": (OtelConfig, {
        "enabled": _Field("bool", check_bool, "a span per job attempt, continuing the "
                          "enqueuer's trace (needs pulse-queue[otel])"),
    }),
}
_TYPE_CHECKS: dict[str, Check] = {
    # a timeout's floor is an enqueue's (job_input.TIMEOUT_MIN_S)
    "max_attempts": check_integer(1), "timeout": check_duration(minimum=0.001),
    "priority": check_integer(*SMALLINT),
    "concurrency": check_integer(1), "rate": check_rate,
}
_CRON_CHECKS: dict[str, Check] = {
    "name": check_job_label, "type": check_job_label, "schedule": check_schedule,
    # the cron duty looks once a CRON_INTERVAL_S (1 s); a finer interval is a mistake
    "every": check_duration(minimum=1.0),
    "payload": check_json_table, "queue": check_job_label, "priority": check_integer(*SMALLINT),
    "catch_up": check_bool, "timezone": check_timezone,
}
_TOP_LEVEL = (*_SECTIONS, "types", "cron")
