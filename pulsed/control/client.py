"""The control socket's client: one request, one reply, one connection.

    client = ControlClient("/var/lib/pulsed/pulsed.sock")
    client.request("status")                      # the reply without "ok"
    client.request("scale", workers="+2")         # {"workers": 6}
    client.request("drain", wait=True, timeout=300)   # waits up to 300 s (+ a margin)

A daemon that cannot be reached raises DaemonUnreachable (pulsectl exits 3),
DaemonNotAnswering when something holds the socket but no reply comes in
time (the daemon drops a write request whose client hung up before it read
it: pulsed/control/commands.py);
an error reply raises ControlError with the daemon's code and message.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Mapping

from pulsed.control import protocol
from pulsed.control.protocol import ControlError
from pulsed.errors import PulseError

DEFAULT_TIMEOUT = 10.0  # seconds for one request, connect to reply
WAIT_MARGIN = 10.0  # seconds beyond a daemon-side wait before the client gives up
MAX_REPLY = 64 * 1024 * 1024  # bytes; a status reply is a few KiB
_RECV_CHUNK = 64 * 1024
_BACKLOG_RETRY = 0.01  # seconds between connects while the backlog is full
_DEFAULT: Any = object()


class DaemonUnreachable(PulseError):
    """pulsed did not answer on its control socket."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot reach pulsed at {path}: {reason}")


class DaemonNotAnswering(DaemonUnreachable):
    """Something holds the socket (pulsed, frozen or overloaded) but no reply
    came in time."""


class ControlClient:
    def __init__(self, path: Path | str, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.path = Path(path)
        self.timeout = timeout  # None: wait for ever

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send ``cmd`` with ``args`` (None values left out); the reply without "ok"."""
        return self.call(cmd, args)

    def call(self, cmd: str, args: Mapping[str, Any] | None = None, *,
             timeout: float | None = _DEFAULT) -> dict[str, Any]:
        """request(), with the arguments as a dict and the timeout overridable.

        Without an explicit timeout, a request that waits in the daemon
        (drain with wait) gets the daemon's own timeout plus a margin, or none.
        """
        if timeout is _DEFAULT:
            timeout = self._timeout_for(args or {})
        line = protocol.encode(protocol.request_message(cmd, **(args or {})))
        reply = self._exchange(line, timeout)
        try:
            return protocol.reply_result(protocol.decode(reply))
        except ControlError as exc:
            if exc.code == protocol.BAD_REQUEST:  # the daemon's reply, not our request
                raise DaemonUnreachable(self.path, f"its reply was malformed: "
                                                   f"{exc.message}") from None
            raise

    def _timeout_for(self, args: Mapping[str, Any]) -> float | None:
        if not args.get("wait") or self.timeout is None:
            return self.timeout
        waits = args.get("timeout")
        if not isinstance(waits, (int, float)):
            return None  # the daemon waits as long as it takes; so do we
        return max(self.timeout, waits + WAIT_MARGIN)

    def _exchange(self, line: bytes, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                self._connect(sock, deadline)
            except FileNotFoundError:
                raise self._unreachable("no socket there") from None
            except ConnectionRefusedError:
                raise self._unreachable("connection refused (a stale socket: pulsed is "
                                        "not running)") from None
            except PermissionError:
                raise self._unreachable("permission denied (use root, the daemon's user, "
                                        "or a member of daemon.socket_group)") from None
            except TimeoutError:
                raise DaemonNotAnswering(self.path, f"no answer within {timeout:g}s") from None
            except OSError as exc:
                raise self._unreachable(exc.strerror or str(exc)) from None
            try:
                sock.sendall(line)
            except (BrokenPipeError, ConnectionResetError):
                pass  # it may have replied before closing (forbidden, busy): read on
            except TimeoutError:
                raise DaemonNotAnswering(self.path, f"no answer within {timeout:g}s") from None
            except OSError as exc:
                raise self._unreachable(exc.strerror or str(exc)) from None
            return self._read_line(sock, deadline, timeout)

    def _connect(self, sock: socket.socket, deadline: float | None) -> None:
        """Connect, retrying while the daemon's backlog is full (EAGAIN)."""
        while True:
            try:
                sock.connect(os.fsencode(self.path))
                return
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError from None
                time.sleep(_BACKLOG_RETRY)

    def _read_line(self, sock: socket.socket, deadline: float | None,
                   timeout: float | None) -> bytes:
        data = bytearray()
        while b"\n" not in data:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DaemonNotAnswering(self.path, f"no reply within {timeout:g}s")
                sock.settimeout(remaining)
            try:
                chunk = sock.recv(_RECV_CHUNK)
            except TimeoutError:
                raise DaemonNotAnswering(self.path, f"no reply within {timeout:g}s") from None
            except OSError as exc:
                raise self._unreachable(f"the connection failed: "
                                        f"{exc.strerror or exc}") from None
            if not chunk:
                raise self._unreachable("the connection closed before a reply")
            data += chunk
            if len(data) > MAX_REPLY:
                raise self._unreachable(f"its reply is longer than {MAX_REPLY} bytes")
        return bytes(data[:data.index(b"\n")])

    def _unreachable(self, reason: str) -> DaemonUnreachable:
        return DaemonUnreachable(self.path, reason)
