"""`pulsed`: load the config, prepare the database, run the master."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import psycopg

import pulsed
from pulsed import metrics
from pulsed.config import Config, load_config
from pulsed.db.connect import Backoff, connect as db_connect
from pulsed.control.server import ControlServer
from pulsed.db.embedded import EmbeddedPostgres
from pulsed.db.migrate import migrate
from pulsed.db.store import Store
from pulsed.dsn import embedded_server, redact
from pulsed.errors import (EXIT_CONFIG, EXIT_DATABASE_UNREACHABLE, EXIT_FAILURE,
                           EXIT_NODE_IN_USE, EXIT_OK, ConfigError, DatabaseUnreachable, NodeInUse,
                           PulseError)
from pulsed.logs import setup_logging
from pulsed.node import NodeClaim, claim_node, release_node
from pulsed.preflight import check_handlers
from pulsed.master import Master
from pulsed.roles import ROLE_MAINS

log = logging.getLogger("pulsed")

START_RETRY_BASE_S = 0.5  # an unreachable database at start: first retry after this
START_RETRY_CAP_S = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pulsed",
        description="Run the Pulse daemon: a master that supervises a scheduler and N workers.",
        epilog="With no database.url (or PULSE_DATABASE_URL) it starts a private PostgreSQL "
               "in its state directory.",
    )
    parser.add_argument("--config", metavar="PATH",
                        help="config file (default ./pulse.toml, then /etc/pulsed/pulse.toml)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config and exit (78 if it is invalid)")
    parser.add_argument("--migrate", action="store_true",
                        help="apply database migrations and exit")
    parser.add_argument("--workers", type=int, metavar="N", help="override daemon.workers")
    parser.add_argument("--role", choices=tuple(ROLE_MAINS),
                        help="run this one role in this process, without a master (for "
                             "orchestrators that run one process per container)")
    parser.add_argument("--version", action="version", version=f"pulsed {pulsed.__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"pulsed: invalid config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.workers is not None:
        if args.workers < 0:
            print("pulsed: --workers must be >= 0", file=sys.stderr)
            return EXIT_CONFIG
        config = _with_workers(config, args.workers)
    if args.check_config:
        return check_config(config)
    setup_logging(config.daemon.log_format, config.daemon.log_level)
    try:
        if args.role:
            return run_alone(config, args.role)
        return run(config, migrate_only=args.migrate)
    except NodeInUse as exc:
        log.error("refusing to start: %s", exc)
        return EXIT_NODE_IN_USE
    except DatabaseUnreachable as exc:
        log.error("%s", exc)
        return EXIT_DATABASE_UNREACHABLE
    except PulseError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE


def check_config(config: Config) -> int:
    """`--check-config`: the config is valid (checked by loading it) and its
    handler modules import as a worker would import them."""
    try:
        check_handlers(config)
    except ConfigError as exc:
        print(f"pulsed: invalid config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    modules = ", ".join(config.worker.handlers)
    print(f"config OK ({config.source or 'built-in defaults'})"
          + (f"; handler modules import: {modules}" if modules else ""))
    return EXIT_OK


def run(config: Config, *, migrate_only: bool = False) -> int:
    state_dir = Path(config.daemon.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    control = None
    if not migrate_only:
        # First, so a second pulsed on the same socket fails before it
        # touches the database.
        control = ControlServer(config.daemon.socket_path, _NotYet(),
                                group=config.daemon.socket_group)
        control.open()
    embedded = None
    if config.database.url:
        dsn = config.database.url
        log.info("database: %s", redact(dsn))
    else:
        embedded = embedded_server(config)
        dsn = _start_embedded(embedded)
    try:
        master = None
        with connect_at_start(dsn, config.database.start_wait, config.database.pooler) as conn:
            applied = migrate(conn)
            node = None if control is None else claim_node(
                conn, config.daemon.node_id, master_pid=os.getpid())
            if control is not None and node is not None:
                master = _master_for(config, dsn, node, conn)
        _report_migrations(applied, migrate_only=migrate_only)
        if control is None or node is None or master is None:
            return EXIT_OK
        try:
            return _run_master(master, config, control)
        finally:
            release_node(dsn, node)
    except psycopg.OperationalError as exc:
        log.error("cannot reach the database: %s", exc)
        return EXIT_FAILURE
    finally:
        if control is not None:
            control.close()
        if embedded is not None:
            embedded.stop()


def run_alone(config: Config, role: str) -> int:
    """`pulsed --role R`: migrate (under the migration lock: replicas may
    start together), then run the role in this process."""
    if not config.database.url:
        log.error("--role needs database.url (or PULSE_DATABASE_URL): roles in separate "
                  "processes must share one PostgreSQL, not start a private one each")
        return EXIT_CONFIG
    with connect_at_start(config.database.url, config.database.start_wait) as conn:
        _report_migrations(migrate(conn), migrate_only=False)
    from pulsed.standalone import run_role  # its HTTP probes: not on a master's way to a claim
    return run_role(config, config.database.url, role)


def _start_embedded(embedded: EmbeddedPostgres) -> str:
    """Start the embedded server, or adopt one an earlier pulsed left
    running (killed before it could stop it): either way this pulsed owns
    it now and stops it when it exits. Its URL is printed for applications."""
    if embedded.is_running():
        log.info("adopting the embedded PostgreSQL left running in %s; it stops with "
                 "this pulsed", embedded.data_dir)
    dsn = embedded.start()
    log.info("embedded PostgreSQL ready in %s; applications connect to %s "
             "(pulsed.connect() and `pulsectl config dsn` find it)", embedded.data_dir, dsn)
    return dsn


def _report_migrations(applied: list[int], *, migrate_only: bool) -> None:
    if applied:
        log.info("applied migrations %s", applied)
    elif migrate_only:  # otherwise --migrate would say nothing at all
        log.info("the schema is up to date; nothing to apply")


def connect_at_start(dsn: str, wait: float, pooler: str | None = None) -> psycopg.Connection:
    """Connect, retrying with capped backoff for up to `wait` seconds: a
    database that is still starting (booted with this host, restarting)
    is not a reason to exit; one that stays away is, with a status of its
    own (EXIT_DATABASE_UNREACHABLE) that says why."""
    deadline = time.monotonic() + wait
    backoff = Backoff(START_RETRY_BASE_S, START_RETRY_CAP_S, jitter=0.2)
    while True:
        try:
            return db_connect(dsn, "start", pooler=pooler)
        except psycopg.OperationalError as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            left = deadline - time.monotonic()
            if left <= 0:
                raise DatabaseUnreachable(
                    f"cannot reach the database, giving up after {wait:g}s "
                    f"(database.start_wait): {reason}") from exc
            delay = min(backoff.next_delay(), left)
            log.warning("cannot reach the database yet (%s); retrying in %.1fs, for %.0fs more",
                        reason, delay, left)
            time.sleep(delay)


def _master_for(config: Config, dsn: str, node: NodeClaim, conn: psycopg.Connection) -> Master:
    """The master, its killed predecessor's leases recovered on pulsed's
    start connection (before the first fork, without a connection of its
    own: start-up is exec to the first claim)."""
    try:
        master = Master(config, dsn, node=node)
        master.recover_previous_incarnation(Store(conn))
    except BaseException:
        release_node(dsn, node)
        raise
    return master


class _NotYet:
    """The control target until the master exists: nothing is served
    before the master's loop runs, so this is never called."""


def _run_master(master: Master, config: Config, control: ControlServer) -> int:
    master.control = control
    control.target = master
    # The control socket is ours, so no other pulsed uses this state dir.
    metrics.setup_multiproc_dir(config.daemon.state_dir)
    return master.run()


def _with_workers(config: Config, workers: int) -> Config:
    from dataclasses import replace
    return replace(config, daemon=replace(config.daemon, workers=workers))


if __name__ == "__main__":
    sys.exit(main())
