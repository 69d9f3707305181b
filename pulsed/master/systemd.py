"""The sd_notify protocol, in a few lines of stdlib (no dependency).

Only the master talks to systemd. Without $NOTIFY_SOCKET every call is a
no-op, so the daemon behaves the same outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env)
        self.address = env.get("NOTIFY_SOCKET") or None
        if self.address and self.address.startswith("@"):  # abstract namespace
            self.address = "\0" + self.address[1:]
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog_ours = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and watchdog_ours else None
        self._next_watchdog = 0.0
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> None:
        """Send KEY=value lines, e.g. send(READY=1, STATUS="4 workers")."""
        if not self.address:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(message.encode())
        except OSError as exc:
            log.warning("could not notify systemd (%s): %s", self.address, exc)

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(STATUS=status)

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.send(STOPPING=1)

    def tick(self, now: float) -> None:
        """WATCHDOG=1 at half WATCHDOG_USEC, from the master's loop only:
        if the loop hangs, systemd notices."""
        if self.watchdog_interval and now >= self._next_watchdog:
            self.send(WATCHDOG=1)
            self._next_watchdog = now + self.watchdog_interval
