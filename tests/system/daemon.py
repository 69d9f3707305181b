"""Run the real `pulsed` as a subprocess, in its own session, for system tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

from tests.pg import wait_until

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Daemon:
    def __init__(self, root: Path, dsn: str, *, node_id: str = "node-a", workers: int | str = 2,
                 config: dict[str, Any] | None = None,
                 env: dict[str, str | None] | None = None, role: str | None = None) -> None:
        self.role = role  # `pulsed --role ROLE`: that role alone, no master
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.dsn = dsn
        self.state_dir = root / "state"
        # pytest's folders can be deep; AF_UNIX paths must fit in 107 bytes.
        self.socket_path = Path(tempfile.mkdtemp(prefix="pulse-sock-")) / "pulsed.sock"
        self.config_path = root / "pulse.toml"
        self.log_path = root / "pulsed.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config(node_id=node_id, workers=workers, extra=config or {})

    def write_config(self, *, node_id: str, workers: int | str, extra: dict[str, Any]) -> None:
        config: dict[str, Any] = {
            "database": {"url": self.dsn},
            "daemon": {"state_dir": str(self.state_dir), "socket": str(self.socket_path),
                       "workers": workers,
                       "node_id": node_id, "stop_timeout": 5},
            "worker": {"handlers": ["tests.system.jobs"], "poll_interval": 0.5},
            "scheduler": {"leader_ttl": 3, "interval": 0.2},
            # The API is on by default on 127.0.0.1:8080: daemons side by side
            # would fight for the port. Tests that want it pass a free port.
            "api": {"enabled": False},
        }
        for section, values in extra.items():
            config.setdefault(section, {}).update(values)
        self.config = config
        self.config_path.write_text(tomli_w.dumps(config))

    def start(self, *, cwd: Path | None = None) -> "Daemon":
        """Run it from `cwd` (default: the config's folder); a variable set to
        None in `env` is left out (say PYTHONPATH)."""
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.env}
        env.pop("NOTIFY_SOCKET", None) if "NOTIFY_SOCKET" not in self.env else None
        env = {name: value for name, value in env.items() if value is not None}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pulsed", "--config", str(self.config_path),
             *(["--role", self.role] if self.role else [])],
            cwd=cwd or self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self) -> dict[int, str]:
        """Live children of the master: pid -> process title."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return {}
        found = {int(p): _cmdline(int(p)) for p in text.split()}
        return {pid: title for pid, title in found.items() if title and pid_alive(pid)}

    def workers(self) -> dict[int, str]:
        return {p: t for p, t in self.children().items() if t.startswith("pulsed: worker")}

    def scheduler(self) -> int | None:
        return next((p for p, t in self.children().items() if t.startswith("pulsed: scheduler")),
                    None)

    def wait_ready(self, workers: int | None = None, timeout: float = 20) -> None:
        want = self.config["daemon"]["workers"] if workers is None else workers
        wait_until(lambda: len([t for t in self.workers().values() if "[starting]" not in t]) == want
                   and self.scheduler() is not None, timeout=timeout,
                   message=f"daemon never had {want} workers up; log:\n{self.log_tail()}")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def status(self) -> dict[str, Any]:
        from pulsed.control.client import ControlClient
        return ControlClient(self.socket_path, timeout=5).request("status")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def kill_all(self) -> None:
        """Teardown: the master's whole session, and any orphaned child."""
        if self.proc is None:
            return
        kids = list(self.children())
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.socket_path.parent, ignore_errors=True)
