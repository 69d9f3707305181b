"""The HTTP API's listening socket, held by the master across api children.

The master binds `api.listen` once and each api child it forks serves on
its own copy of that socket, as gunicorn's arbiter holds its listeners. A
reload starts the new api child next to the old one on the same socket, so
no connection is refused and none waiting in the backlog is lost while they
change places. (Each child binding for itself, the new one met "Address
already in use" until the old one left; SO_REUSEPORT would also let a
second pulsed, or anyone of the same uid, silently share the port.)

Standard library only: the master must not import pulsed.http (~14 ms of
every start-up).
"""

from __future__ import annotations

import socket

BACKLOG = 128  # connections the kernel queues while no child accepts


def parse_listen(listen: str) -> tuple[str, int, socket.AddressFamily]:
    """'127.0.0.1:8080', '[::1]:8080' or 'localhost:8080' -> (host, port, family)."""
    host, _, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1], int(port), socket.AF_INET6
    return host, int(port), socket.AF_INET6 if ":" in host else socket.AF_INET


def bind(listen: str) -> socket.socket:
    """A listening TCP socket on `listen`, non-blocking: several children may
    wait on it at once, and the ones that lose the race for a connection
    must get EAGAIN from accept(), not block in it (a blocked accept would
    hold up a child's shutdown until the next connection)."""
    host, port, family = parse_listen(listen)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As the stdlib's HTTPServer: rebinding after a restart must not
        # wait for the previous run's connections in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ApiListener:
    """The master's socket for api.listen, bound on first use and again
    when a reload changes the address."""

    def __init__(self) -> None:
        self.listen: str | None = None
        self.sock: socket.socket | None = None

    def for_child(self, listen: str) -> socket.socket | None:
        """A copy of the socket for an api child about to be forked (the
        caller closes it once the child has it), or None when it cannot be
        bound: the child then binds by itself and reports why it failed."""
        if self.sock is None or self.listen != listen:
            self.close()
            try:
                self.sock = bind(listen)
            except (OSError, ValueError, OverflowError):
                return None
            self.listen = listen
        return self.sock.dup()

    def close(self) -> None:
        """Stop listening (a reload turned the API off, or the master stops);
        children keep their copies until they exit."""
        if self.sock is not None:
            self.sock.close()
        self.sock = self.listen = None
