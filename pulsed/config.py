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

This module parses and loads; the dataclasses and their defaults are in
config_model, the value checks in config_values, the per-section tables in
config_schema and the commented default file in config_render (all
re-exported here).
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

# pulsed.config is the public path: the model, the value parsers and the
# rendering are re-exported from the modules that hold them.
from pulsed.config_model import (
    DAY, DEFAULT_CANCEL_GRACE, DEFAULT_CRON_TIMEZONE, DEFAULT_HEARTBEAT_TIMEOUT, DEFAULT_LEADER_TTL,
    DEFAULT_LEASE_TTL, DEFAULT_LISTEN, DEFAULT_MAX_RESULT_BYTES, DEFAULT_POLL_INTERVAL,
    DEFAULT_SCHEDULER_INTERVAL, DEFAULT_START_WAIT, DEFAULT_STOP_TIMEOUT, DEFAULT_WORKERS,
    LOG_FORMATS, LOG_LEVELS, MAX_CONCURRENCY, MAX_RESULT_BYTES, ROOT_RUNTIME_DIR, ROOT_STATE_DIR,
    SMALLINT, SOCKET_NAME, ApiConfig, Config, CronEntry, DaemonConfig, DatabaseConfig, OtelConfig,
    Rate, SchedulerConfig, TypeConfig, WorkerConfig, WorkerRange, default_socket,
    default_state_dir)
from pulsed.config_schema import _CRON_CHECKS, _SECTIONS, _TOP_LEVEL, _TYPE_CHECKS
from pulsed.config_values import parse_duration, parse_rate
from pulsed.errors import ConfigError, JobInputError

__all__ = [
    "DAY", "DEFAULT_CANCEL_GRACE", "DEFAULT_CONFIG_PATHS", "DEFAULT_CRON_TIMEZONE",
    "DEFAULT_HEARTBEAT_TIMEOUT", "DEFAULT_LEADER_TTL", "DEFAULT_LEASE_TTL", "DEFAULT_LISTEN",
    "DEFAULT_MAX_RESULT_BYTES", "DEFAULT_POLL_INTERVAL", "DEFAULT_SCHEDULER_INTERVAL",
    "DEFAULT_START_WAIT", "DEFAULT_STOP_TIMEOUT", "DEFAULT_WORKERS", "LOG_FORMATS", "LOG_LEVELS",
    "MAX_CONCURRENCY", "MAX_RESULT_BYTES", "ROOT_RUNTIME_DIR", "ROOT_STATE_DIR", "SMALLINT",
    "SOCKET_NAME", "ApiConfig", "Config", "CronEntry", "DaemonConfig", "DatabaseConfig",
    "OtelConfig", "Rate", "SchedulerConfig", "TypeConfig", "WorkerConfig", "WorkerRange", "default_config", "default_socket",
    "default_state_dir", "import_path", "load_config", "parse_config", "parse_duration",
    "parse_rate", "render_default_config",
]

# /etc/pulsed, not /etc/pulse: Debian's libpulse0 (PulseAudio) owns that;
# an /etc/pulse/pulse.toml from before the rename is still read, last.
DEFAULT_CONFIG_PATHS = (Path("pulse.toml"), Path("/etc/pulsed/pulse.toml"),
                        Path("/etc/pulse/pulse.toml"))
_ENV_TRUE, _ENV_FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


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
    workers = values["daemon"].get("workers")
    if isinstance(workers, WorkerRange):  # the master starts at MIN and autoscales
        values["daemon"].update(workers=workers.low, autoscale=workers)
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
    entry = CronEntry(**{key: _CRON_CHECKS[key](f"{label}.{key}", value)
                         for key, value in table.items()})
    _check_cron_job(label, entry)
    return entry


# The longest tick a cron job's idempotency key holds (microseconds, an offset)
LONGEST_TICK = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-14)))


def cron_job_params(entry: CronEntry, tick: datetime) -> dict[str, Any]:
    """The job a cron entry enqueues at `tick` (JobInputError if refused)."""
    from pulsed.job_input import job_params  # it imports this module (through contrib.otel)
    return job_params(type=entry.type, payload=entry.payload, queue=entry.queue,
                      priority=entry.priority,
                      idempotency_key=f"cron:{entry.name}:{tick.isoformat()}")


def _check_cron_job(label: str, entry: CronEntry) -> None:
    """Refuse an entry whose job enqueue would refuse at every tick (a NaN or
    a NUL in its payload, a name too long for the job's idempotency key): at
    load and at reload, not in the leader's scheduler."""
    from pulsed.job_input import MAX_TEXT_LENGTH  # as cron_job_params's import
    try:
        cron_job_params(entry, LONGEST_TICK)
    except JobInputError as exc:
        if exc.argument == "idempotency_key":
            room = len(f"cron:{entry.name}:{LONGEST_TICK.isoformat()}") - len(entry.name)
            raise ConfigError(f"{label}.name", f"must be at most {MAX_TEXT_LENGTH - room} "
                                               f"characters (the job's idempotency key is "
                                               f"cron:NAME:TICK), got {len(entry.name)}") from None
        raise ConfigError(f"{label}.{exc.argument}", exc.problem) from None


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
    scheduler, api, database = config.scheduler, config.api, config.database
    if database.pooler is not None and database.url is None:
        raise ConfigError("database.pooler", "needs database.url (the pooler's address); "
                          "the embedded PostgreSQL has no pooler in front of it")
    if database.listen_url is not None and database.pooler is None:
        raise ConfigError("database.listen_url", "applies only with database.pooler "
                          "(without a pooler, workers LISTEN on database.url)")
    if scheduler.interval >= scheduler.leader_ttl:  # the leader renews once a tick
        raise ConfigError("scheduler.interval", f"must be less than scheduler.leader_ttl "
                          f"({scheduler.leader_ttl:g}s), got {scheduler.interval:g}s")
    if api.enabled and not (api.token or api.tokens) and not _is_loopback(api.listen):
        raise ConfigError("api.token", f"must be set when api.listen ({api.listen!r}) "
                          "is not a loopback address")
    if config.otel.enabled and _missing("opentelemetry.trace"):
        raise ConfigError("otel.enabled", "is true but OpenTelemetry is not installed: "
                          "pip install 'pulse-queue[otel]' (and an SDK to export spans)")


def _missing(module: str) -> bool:
    """Is `module` not importable here (an optional extra not installed)?"""
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # its parent package is missing
        return True


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


def render_default_config() -> str:
    """The default config as commented TOML (`pulsectl config init`).
    Imported here when asked for: tomli_w and the renderer are not on a
    daemon's way to its first claim."""
    from pulsed.config_render import render_default_config as render
    return render()
