"""Schema migrations: versioned SQL files applied in order, exactly once.

Files are ``migrations/NNNN_name.sql``. Each runs in a transaction of its
own under a transaction-level advisory lock, so two processes migrating at
once serialise instead of colliding; each applied version is recorded in
``pulse_migrations`` in the same transaction as its DDL.

Migrations run beside the older version's daemons (a rolling upgrade).
A migration's table lock (ALTER TABLE: ACCESS EXCLUSIVE; CREATE INDEX:
SHARE) cannot be granted while any transaction on that table is open, and
while it waits, queued, every claim, completion and enqueue on the table
waits behind it: an application's transaction left open for minutes (an
enqueue not yet committed) stopped the whole fleet for minutes. So a
migration asks for its locks with a short lock_timeout and, refused, steps
back and tries again, the others running in between; and each migration
commits on its own, so 0013's exclusive lock is not held through 0014's
index build.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from importlib import resources

import psycopg

from pulsed.errors import MigrationError

log = logging.getLogger(__name__)

# An arbitrary constant shared by every Pulse process: "pulse" in ASCII.
MIGRATION_LOCK_KEY = 0x70756C7365
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# How long a migration's lock request may stand queued ahead of the workers'
# statements, and the pause it leaves them before asking again.
LOCK_TIMEOUT_MS = 2000
LOCK_RETRY_PAUSE_S = 1.0
# How long to keep trying before giving up with the sessions in the way.
DEFAULT_LOCK_WAIT_S = 600.0


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    """The migrations shipped with the package, in version order."""
    folder = resources.files("pulsed.db") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    return sorted(found, key=lambda m: m.version)


def migrate(conn: psycopg.Connection, *, lock_wait: float = DEFAULT_LOCK_WAIT_S) -> list[int]:
    """Apply every pending migration; return the versions applied now.

    Safe to call concurrently from several processes and to call again: the
    second caller waits on the lock, then finds nothing to do. A migration
    whose table lock is not granted is retried for up to `lock_wait`
    seconds (module docstring: why), then MigrationError names who holds it.
    """
    applied_now = []
    deadline = time.monotonic() + lock_wait
    try:
        while True:
            try:
                migration = _apply_next(conn)
            except psycopg.errors.LockNotAvailable:
                holders = _lock_holders(conn)
                if time.monotonic() >= deadline:
                    raise MigrationError(
                        f"migration gave up after {lock_wait:g}s waiting for a lock on Pulse's "
                        f"tables, held by {holders}; end those transactions, then migrate "
                        "again (nothing was half-applied)") from None
                log.warning("migration waits for a lock on Pulse's tables held by %s; "
                            "retrying (the workers run meanwhile)", holders)
                time.sleep(LOCK_RETRY_PAUSE_S)
                continue
            if migration is None:
                _warn_if_newer(conn)
                return applied_now
            applied_now.append(migration.version)
    except psycopg.errors.ReadOnlySqlTransaction as exc:
        raise MigrationError(f"migration failed: {exc}; {_why_read_only(conn)}") from exc
    except psycopg.errors.InvalidSchemaName as exc:  # "no schema has been selected to create in"
        raise MigrationError(f"migration failed: {exc}; {_why_no_schema(conn)}") from exc
    except psycopg.Error as exc:
        raise MigrationError(f"migration failed: {exc}") from exc


def _apply_next(conn: psycopg.Connection) -> Migration | None:
    """Apply the first pending migration in a transaction of its own; None
    when none is pending."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        # Only now: waiting for another process's migration is right.
        conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS pulse_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM pulse_migrations")}
        pending = [m for m in available_migrations() if m.version not in done]
        if not pending:
            return None
        migration = pending[0]
        log.info("applying migration %04d_%s", migration.version, migration.name)
        conn.execute(migration.sql.encode())
        conn.execute(
            "INSERT INTO pulse_migrations (version, name) VALUES (%s, %s)",
            (migration.version, migration.name),
        )
        return migration


def _warn_if_newer(conn: psycopg.Connection) -> None:
    """Say so when a newer pulsed has migrated past this one's migrations
    (a rolling upgrade, or a host left behind): this version runs on that
    schema, for migrations only add to it, but the operator should know
    the fleet runs two versions, and which this host is."""
    newest = available_migrations()[-1]
    row = conn.execute("SELECT version, name FROM pulse_migrations ORDER BY version DESC"
                       " LIMIT 1").fetchone()
    if row and row[0] > newest.version:
        log.warning("the database schema is at version %04d_%s, newer than this pulsed's "
                    "%04d_%s: a newer pulsed migrated it; this one runs on it (migrations "
                    "only add, older versions keep working), but upgrade this host to the "
                    "version the others run", row[0], row[1], newest.version, newest.name)


def _lock_holders(conn: psycopg.Connection) -> str:
    """The other sessions holding locks on Pulse's tables: pid, application,
    state, how long their transaction has been open."""
    rows = conn.execute(
        "SELECT a.pid, a.application_name, a.state,"
        " round(extract(epoch FROM now() - a.xact_start))::bigint"
        " FROM pg_stat_activity a WHERE a.pid <> pg_backend_pid()"
        " AND a.pid IN (SELECT l.pid FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
        " WHERE l.granted AND c.relname LIKE 'pulse\\_%')"
        " ORDER BY a.xact_start").fetchall()
    if not rows:
        return "sessions whose transactions have ended since"
    return ", ".join(f"pid {pid} ({app or 'no application_name'}, {state}, "
                     f"transaction open {age}s)" for pid, app, state, age in rows)


def _why_no_schema(conn: psycopg.Connection) -> str:
    """PostgreSQL's message does not say that the search_path (set on the
    database or the role with ALTER ... SET, which every Pulse session
    inherits) names no schema that exists."""
    try:
        path = conn.execute("SHOW search_path").fetchone()[0]  # type: ignore[index]
    except psycopg.Error:
        return "the search_path names no schema that exists"
    return (f"search_path is {path} and names no schema that exists (set on this database "
            "or role with ALTER DATABASE / ALTER ROLE ... SET, in postgresql.conf or in the "
            "URL's options); Pulse's tables live in its first schema: give Pulse one, e.g. "
            "options=-c search_path=public in database.url")


def _why_read_only(conn: psycopg.Connection) -> str:
    """What makes every transaction here read-only, and what to do: PostgreSQL's
    message names neither a standby nor default_transaction_read_only set on
    the database or the role (ALTER DATABASE / ROLE ... SET), which every
    Pulse session inherits."""
    try:
        standby, default, database = conn.execute(
            "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only'),"
            " quote_ident(current_database())").fetchone()  # type: ignore[misc]
    except psycopg.Error:
        return "Pulse needs a database it can write to"
    if standby:
        return "the server is a standby (in recovery); point database.url at the primary"
    if default == "on":
        return ("default_transaction_read_only is on (set on this database or role with "
                "ALTER DATABASE / ALTER ROLE ... SET, in postgresql.conf or in the URL's "
                "options); Pulse writes in every session: turn it off for Pulse, e.g. "
                f"ALTER DATABASE {database} SET default_transaction_read_only = off")
    return "Pulse needs a database it can write to"


def current_version(conn: psycopg.Connection) -> int | None:
    """The newest applied version, or None for a database never migrated."""
    row = conn.execute("SELECT to_regclass('pulse_migrations') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    row = conn.execute("SELECT max(version) FROM pulse_migrations").fetchone()
    return row[0] if row else None
