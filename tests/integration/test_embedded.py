"""The embedded server itself; these run whatever PULSE_TEST_DSN says."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pulsed.db.embedded import (
    MAX_SOCKET_PATH,
    SERVICE_USER,
    EmbeddedPostgres,
    PidFile,
    ensure_embedded,
)
from pulsed.errors import EmbeddedServerError
from tests.pg import wait_until


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A scratch directory; any server started under it is stopped after."""
    root = Path(tempfile.mkdtemp(prefix="pulse-emb-"))
    yield root
    for pid_file in root.rglob("postmaster.pid"):
        _stop(EmbeddedPostgres(pid_file.parent))
    shutil.rmtree(root, ignore_errors=True)


def _stop(server: EmbeddedPostgres) -> None:
    info = PidFile.read(server.data_dir)
    try:
        server.stop(mode="immediate", timeout=10)
    except EmbeddedServerError:
        if info:
            os.kill(info.pid, signal.SIGKILL)
    if server.socket_dir != server.data_dir:
        shutil.rmtree(server.socket_dir, ignore_errors=True)


def postmaster_pid(server: EmbeddedPostgres) -> int:
    info = PidFile.read(server.data_dir)
    assert info is not None, "no postmaster.pid"
    return info.pid


def test_start_serves_database_pulse_on_a_unix_socket_only(workdir: Path) -> None:
    server = EmbeddedPostgres(workdir / "data")

    dsn = server.start()

    assert server.is_running()
    assert dsn == server.dsn()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("pulse",)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)
        assert conn.execute("SELECT inet_server_addr()").fetchone() == (None,)  # a socket


def test_a_second_instance_reuses_the_running_server(workdir: Path) -> None:
    first = EmbeddedPostgres(workdir / "data")
    first.start()
    pid = postmaster_pid(first)

    second = EmbeddedPostgres(workdir / "data")
    dsn = second.start()

    assert postmaster_pid(second) == pid
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT pg_postmaster_start_time() IS NOT NULL").fetchone() == (True,)


def test_stop_ends_the_server_and_is_idempotent(workdir: Path) -> None:
    server = EmbeddedPostgres(workdir / "data")
    dsn = server.start()

    server.stop()

    assert not server.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)
    server.stop()  # nothing to stop: no error


def test_start_after_kill_9_recovers_from_the_stale_pid_file(workdir: Path) -> None:
    server = EmbeddedPostgres(workdir / "data")
    with psycopg.connect(server.start(), autocommit=True) as conn:
        conn.execute("CREATE TABLE survivor (id int)")
    old_pid = postmaster_pid(server)

    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: not server.is_running(), message="the killed postmaster to die")
    assert (workdir / "data" / "postmaster.pid").exists()  # stale, left behind

    dsn = server.start()

    assert postmaster_pid(server) != old_pid
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regclass('survivor') IS NOT NULL").fetchone() == (True,)


def test_a_deep_data_dir_gets_a_short_private_socket_dir(workdir: Path) -> None:
    data_dir = workdir / ("d" * 60) / ("e" * 60) / "data"
    server = EmbeddedPostgres(data_dir)

    dsn = server.start()

    assert server.socket_dir != data_dir
    assert len(os.fsencode(server.socket_dir / ".s.PGSQL.5432")) <= MAX_SOCKET_PATH
    assert stat.S_IMODE(server.socket_dir.stat().st_mode) == 0o700
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("pulse",)


def test_ensure_embedded_runs_the_server_in_the_state_dir(workdir: Path) -> None:
    dsn = ensure_embedded(workdir / "state")

    assert (workdir / "state" / "postgres" / "PG_VERSION").exists()
    assert ensure_embedded(workdir / "state") == dsn  # reused, same address
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("pulse",)


def test_a_failed_start_reports_the_server_log(workdir: Path) -> None:
    server = EmbeddedPostgres(workdir / "data", settings={"shared_buffers": "lots"})

    with pytest.raises(EmbeddedServerError, match="shared_buffers"):
        server.start(timeout=15)
    assert not server.is_running()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to a system user")
def test_as_root_the_server_runs_as_an_unprivileged_user(workdir: Path) -> None:
    server = EmbeddedPostgres(workdir / "data")
    server.start()

    account = server.owner
    assert account is not None and account.pw_name == SERVICE_USER
    owner = Path(f"/proc/{postmaster_pid(server)}").stat().st_uid
    assert owner == account.pw_uid != 0
    assert (workdir / "data").stat().st_uid == owner
