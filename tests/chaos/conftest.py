"""Fixtures for the fault-injection suite: the system tests' daemons and
marks, private PostgreSQL servers a test may stop, kill or starve, and the
results recorder that docs/chaos.md is built from."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import psycopg
import pytest

from pulsed.db.embedded import EmbeddedPostgres, PidFile
from pulsed.db.migrate import migrate
from tests.system.conftest import daemon_factory, marks  # noqa: F401 - re-exported fixtures
from tests.system.daemon import Daemon

# Durability off where it costs time and proves nothing here. Not
# synchronous_commit: an immediate shutdown would lose commits the clients
# were told about, and the ledger would blame Pulse for them.
PRIVATE_SETTINGS = {"fsync": "off", "full_page_writes": "off", "log_connections": "on",
                    "log_line_prefix": "%m [%p] %a: ", "log_timezone": "UTC"}


class PrivateServer:
    """One test's own PostgreSQL (an EmbeddedPostgres data directory in
    /tmp), migrated, that the test may stop, kill or reconfigure."""

    def __init__(self, root: Path, settings: dict[str, str]) -> None:
        self.root = root
        self.server = EmbeddedPostgres(root / "data", settings=settings)
        self.dsn = ""

    def start(self, timeout: float = 60) -> str:
        self.dsn = self.server.start(timeout=timeout)
        return self.dsn

    def migrate(self, dsn: str | None = None) -> None:
        with psycopg.connect(dsn or self.dsn, autocommit=True) as conn:
            migrate(conn)

    def stop(self, mode: str = "fast") -> None:
        self.server.stop(mode=mode, timeout=30)

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    def admin_dsn(self, dbname: str = "pulse") -> str:
        return self.server.dsn(dbname)


@pytest.fixture
def private_pg() -> Iterator[Callable[..., PrivateServer]]:
    """Make private servers: private_pg(settings={...}) -> started, migrated."""
    made: list[PrivateServer] = []

    def make(settings: dict[str, str] | None = None, *, start: bool = True,
             migrate_db: bool = True) -> PrivateServer:
        root = Path(tempfile.mkdtemp(prefix="pulse-chaos-pg-"))
        root.chmod(0o755)  # as root, the server's own account must pass through
        server = PrivateServer(root, {**PRIVATE_SETTINGS, **(settings or {})})
        made.append(server)
        if start:
            server.start()
            if migrate_db:
                server.migrate()
        return server

    yield make
    for server in made:
        try:
            if PidFile.read(server.server.data_dir) is not None:
                server.server.stop(mode="immediate", timeout=20)
        except Exception:  # noqa: BLE001 - teardown goes on
            pass
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def record() -> Callable[..., dict[str, Any]]:
    """record(fault=..., load=..., lost=..., ...): print the row (run with
    -s to see it) and append it to $PULSE_CHAOS_RESULTS if set."""
    from tests.chaos.harness import record_result
    return record_result


@pytest.fixture
def daemons_on(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Make daemons on any DSN (a private server): daemons_on(dsn, name, ...).
    All are killed as whole process groups at teardown."""
    made: list[Daemon] = []

    def make(dsn: str, name: str = "a", *, cls: type[Daemon] = Daemon, **kwargs: Any) -> Daemon:
        kwargs.setdefault("node_id", f"node-{name}")
        daemon = cls(tmp_path / name, dsn, **kwargs)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill_all()
