"""What every pulsectl command uses: the config, the daemon's control
client, the database connection, output (human or --json) and its errors."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from rich.console import Console

from pulsed import serialize
from pulsed.config import Config, load_config
from pulsed.control.client import DEFAULT_TIMEOUT, ControlClient
from pulsed.db.connect import connect
from pulsed.db.store import Store
from pulsed.dsn import find_database
from pulsed.errors import PulseError, StoreUnavailable

PROG = "pulsectl"
DEFAULT_LIMIT = 50
EXIT_INTERRUPTED = 130
WAIT_FOREVER = -1.0  # `enqueue --wait` without a number of seconds
HELP_WIDTH = 78
PIPE_WIDTH = 1_000_000  # columns when stdout is not a terminal: in effect, no limit


class CommandFailed(PulseError):
    """The command failed (exit status 1)."""


class UsageError(PulseError):
    """The command line is wrong (exit status 2)."""


# -- helpers ------------------------------------------------------------------------


def config_of(args: argparse.Namespace) -> Config:
    if getattr(args, "_loaded_config", None) is None:
        args._loaded_config = load_config(args.config)
    return args._loaded_config


def client_of(args: argparse.Namespace) -> ControlClient:
    path = args.socket if args.socket is not None else config_of(args).daemon.socket_path
    return ControlClient(path, timeout=DEFAULT_TIMEOUT)


@contextmanager
def database_connection(config: Config) -> Iterator[psycopg.Connection]:
    database = find_database(config)
    if config.source is None and database.source == "embedded":
        # Run from a folder without pulse.toml: say whose jobs these are.
        print_error(f"no pulse.toml here; using the embedded database of the pulsed in "
               f"{config.daemon.state_dir}")
    dsn = database.dsn
    try:
        conn = connect(dsn, "pulsectl", pooler=config.database.pooler)
    except psycopg.Error as exc:
        raise CommandFailed(f"cannot connect to the database {describe_dsn(dsn)}: "
                            f"{str(exc).strip()}") from exc
    try:
        with conn:
            yield conn
    except psycopg.errors.UndefinedTable as exc:
        raise CommandFailed(f"the database {describe_dsn(dsn)} has no Pulse schema; "
                            "run `pulsectl migrate`") from exc
    except StoreUnavailable as exc:  # the Store's boundary: the connection went away
        raise CommandFailed(f"lost the connection to the database {describe_dsn(dsn)}: "
                            f"{str(exc.cause).strip()}") from exc
    except psycopg.Error as exc:
        raise CommandFailed(f"database error: {str(exc).strip()}") from exc


@contextmanager
def store_of(args: argparse.Namespace) -> Iterator[Store]:
    with database_connection(config_of(args)) as conn:
        yield Store(conn)


def describe_dsn(dsn: str) -> str:
    """Where a DSN points, without its password."""
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "(unparsable DSN)"
    host = info.get("host") or "localhost"
    port = f":{info['port']}" if info.get("port") else ""
    return f"'{info.get('dbname') or info.get('user') or ''}' on {host}{port}"


def first_set(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def output(args: argparse.Namespace, data: Any, human: Callable[[], Any]) -> None:
    if args.json:
        print_json(data)
    else:
        # markup=False: a message's names (a paused queue, a bulk filter's
        # --error text) are not rich markup: "[link=...]" made a link, "[x]"
        # vanished and a stray "[/b]" raised MarkupError.
        console().print(human(), markup=False)


# json.dumps(ensure_ascii=False) escapes C0 controls but writes DEL, the C1
# controls (U+009B is a CSI by itself) and the bidi overrides raw: a job's
# error or result drove the terminal of an operator reading `pulsectl --json
# job 5`. They occur only inside JSON strings, so \\u escapes keep the value
# exact; other non-ASCII text stays readable.
_RAW_IN_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def json_text(data: Any) -> str:
    """serialize.to_json(data), without characters that drive a terminal."""
    return _RAW_IN_JSON.sub(lambda m: f"\\u{ord(m[0]):04x}", serialize.to_json(data))


def print_json(data: Any) -> None:
    sys.stdout.write(json_text(data) + "\n")


def console(*, stderr: bool = False) -> Console:
    """A terminal gets tables fitted to its width; anything else (a pipe, a
    file, `| grep`) gets every cell whole: rich would otherwise assume 80
    columns and cut them ("HandlerNotFo…")."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, highlight=False)
    return Console(stderr=stderr, highlight=False, width=PIPE_WIDTH, soft_wrap=True)


def print_error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)

