"""Which database a process talks to: the configured URL, or the running
daemon's embedded server.

Only `pulsed` starts the embedded server, and it owns it: it stops it when
it exits. Everything else (pulsectl's job commands, `pulsed.connect()` in a
script, `pulsectl top`) finds the running server through the state
directory and never starts one: a server started by a command outlives it
with no owner, and one started in another directory's state dir holds
another database's jobs (issue 24, item 6).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pulsed.config import Config, load_config
from pulsed.db.connect import connect as db_connect
from pulsed.db.embedded import EmbeddedPostgres
from pulsed.errors import NoDatabase

EMBEDDED_DIR = "postgres"  # the embedded server's data directory, in the state dir
URL_VARIABLE = "PULSE_DATABASE_URL"
HIDDEN = "***"  # a password's stand-in in what is logged or printed


@dataclass(frozen=True)
class Database:
    """Where the database is and how it was found."""

    dsn: str
    source: str  # "config", "environment" or "embedded"
    where: str  # the config file, the variable, or the server's data directory


def embedded_server(config: Config) -> EmbeddedPostgres:
    """The embedded server of the pulsed that uses this config's state dir."""
    return EmbeddedPostgres(Path(config.daemon.state_dir) / EMBEDDED_DIR)


def find_database(config: Config) -> Database:
    """``database.url`` (or PULSE_DATABASE_URL), else the embedded server
    of the pulsed running on this state dir; NoDatabase if there is none."""
    if config.database.url:
        if os.environ.get(URL_VARIABLE, "").strip():
            return Database(config.database.url, "environment", URL_VARIABLE)
        return Database(config.database.url, "config", str(config.source))
    server = embedded_server(config)
    if server.is_running():
        return Database(server.dsn(), "embedded", str(server.data_dir))
    raise NoDatabase(_no_database_message(config))


def _no_database_message(config: Config) -> str:
    found = (f"the config {config.source}" if config.source is not None
             else "no config file (no --config, ./pulse.toml or /etc/pulsed/pulse.toml)")
    return (f"no database: {found} sets no database.url (nor {URL_VARIABLE}), and no pulsed "
            f"is running with its embedded PostgreSQL in {config.daemon.state_dir}.\n"
            "  Start pulsed first (`pulsed`, from the folder of its pulse.toml), or pass "
            "--config naming the running daemon's config.")


def connect(config: Config | str | os.PathLike[str] | None = None,
            **kwargs: Any) -> psycopg.Connection[Any]:
    """Open the database pulsed uses, for scripts: ``config`` is a Config, a
    config file's path, or None to search as pulsed does (./pulse.toml,
    /etc/pulsed/pulse.toml; PULSE_* variables). With no database.url it is
    the embedded server of the running pulsed (NoDatabase if none runs).
    Keyword arguments go to psycopg.connect (autocommit=True, ...)."""
    if not isinstance(config, Config):
        config = load_config(config)
    return db_connect(find_database(config).dsn, "script", pooler=config.database.pooler,
                      **{"autocommit": False, **kwargs})


def redact(dsn: str) -> str:
    """The DSN with its password hidden, for logs and messages."""
    if dsn.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(dsn)
        if parts.password is None:
            return dsn
        userinfo, _, host = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        return urlunsplit(parts._replace(netloc=f"{user}:{HIDDEN}@{host}"))
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "(an unparsable DSN)"
    if "password" in params:
        params["password"] = HIDDEN
    return make_conninfo(**params)
