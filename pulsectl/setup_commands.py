"""The setup commands: migrate the schema, show the database's DSN, write
the commented default config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pulsectl.context import CommandFailed, config_of, database_connection, print_json
from pulsed.config import render_default_config
from pulsed.db.migrate import current_version, migrate
from pulsed.dsn import find_database
from pulsed.errors import EXIT_OK, PulseError


def cmd_migrate(args: argparse.Namespace) -> int:
    with database_connection(config_of(args)) as conn:
        try:
            applied = migrate(conn)
        except PulseError as exc:
            raise CommandFailed(str(exc)) from exc
        version = current_version(conn)
    if args.json:
        print_json({"applied": applied, "version": version})
    elif applied:
        names = ", ".join(f"{v:04d}" for v in applied)
        print(f"applied migration(s) {names}; the schema is at version {version}")
    else:
        print(f"nothing to apply; the schema is at version {version}")
    return EXIT_OK


def cmd_config_dsn(args: argparse.Namespace) -> int:
    database = find_database(config_of(args))
    if args.json:
        print_json({"dsn": database.dsn, "source": database.source, "where": database.where})
    else:
        print(database.dsn)  # plain: for "$(pulsectl config dsn)", never wrapped
    return EXIT_OK


def cmd_config_init(args: argparse.Namespace) -> int:
    text = render_default_config()
    if args.path == "-":
        sys.stdout.write(text)
        return EXIT_OK
    path = Path(args.path)
    try:
        with path.open("w" if args.force else "x") as file:
            file.write(text)
    except FileExistsError:
        raise CommandFailed(f"{path} exists; --force overwrites it") from None
    except OSError as exc:
        raise CommandFailed(f"cannot write {path}: {exc.strerror or exc}") from None
    print(f"wrote {path}")
    return EXIT_OK
