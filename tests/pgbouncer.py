"""A private PgBouncer in transaction mode in front of a test database.

Debian's pgbouncer binary, started as its own process on a free port with a
generated ini (pool_mode = transaction, a small max_client_conn), no
authentication (auth_type = any: the database line names the user) and
pointed at the host and port of the test's DSN, TCP or Unix socket, so it
fronts PULSE_TEST_DSN's server and the embedded one alike. PgBouncer will
not run as root: as root it drops to another account (its `user` setting):
the owner of the server's socket directory when it connects by Unix socket
(the embedded server's, which no one else may enter), else `postgres`.
That account must then read the ini and write the log.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.pg import wait_until

BINARY_PATHS = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
RUN_AS = "postgres"  # when started as root and the server is reached by TCP


def pgbouncer_binary() -> str | None:
    found = shutil.which("pgbouncer")
    return found or next((p for p in BINARY_PATHS if os.access(p, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgBouncer:
    """start() runs it; dsn is the pooled address of the same database."""

    def __init__(self, target_dsn: str, *, max_client_conn: int = 40,
                 pool_size: int = 8) -> None:
        binary = pgbouncer_binary()
        if binary is None:
            raise FileNotFoundError("pgbouncer is not installed (apt-get install pgbouncer)")
        self.binary = binary
        self.target = conninfo_to_dict(target_dsn)
        self.port = _free_port()
        self.max_client_conn = max_client_conn
        self.pool_size = pool_size
        self.root = Path(tempfile.mkdtemp(prefix="pulse-pgbouncer-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return make_conninfo(host="127.0.0.1", port=self.port, dbname=self.target["dbname"],
                             user=self.target.get("user") or "postgres")

    @property
    def log_path(self) -> Path:
        return self.root / "pgbouncer.log"

    def _ini(self) -> str:
        target = self.target
        server = (f"host={target.get('host') or '127.0.0.1'} port={target.get('port') or 5432} "
                  f"dbname={target['dbname']} user={target.get('user') or 'postgres'}")
        lines = [
            "[databases]",
            f"{target['dbname']} = {server}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = any",
            "pool_mode = transaction",
            f"max_client_conn = {self.max_client_conn}",
            f"default_pool_size = {self.pool_size}",
            f"logfile = {self.log_path}",
            "server_reset_query =",
            # A pooled server connection must not carry a client's state to
            # the next: the tests would pass by luck if it did.
            "server_check_query = select 1",
        ]
        if os.geteuid() == 0:
            lines.append(f"user = {self._account().pw_name}")
        return "\n".join(lines) + "\n"

    def _account(self) -> pwd.struct_passwd:
        """Whom PgBouncer runs as when started as root (see the module's docstring)."""
        host = self.target.get("host") or ""
        if host.startswith("/"):
            return pwd.getpwuid(os.stat(host).st_uid)
        return pwd.getpwnam(RUN_AS)

    def start(self) -> "PgBouncer":
        ini = self.root / "pgbouncer.ini"
        ini.write_text(self._ini())
        if os.geteuid() == 0:  # it drops to RUN_AS, which must write its log here
            account = self._account()
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self.proc = subprocess.Popen([self.binary, str(ini)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(self._answers, timeout=10,
                       message=lambda: f"pgbouncer never answered on port {self.port}:\n"
                                       f"{self.log_tail()}")
        except BaseException:
            self.stop()  # the caller never gets it to stop: no stray pgbouncer
            raise
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=2,
                                 prepare_threshold=None) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)
