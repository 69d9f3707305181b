"""The control socket's server, run inside the master's selectors loop.

No threads and no blocking: every socket is non-blocking, each connection
buffers what it has read (up to ``max_line`` unprocessed bytes) and what it
still has to write, and the selector is asked for EVENT_WRITE only while
output is pending. A callback never raises: a peer's garbage, an oversized
line or a dropped connection costs that peer an error reply or its
connection, and a target method that raises gives the peer an error reply
(``failed`` for a PulseError, ``internal`` for a bug) while the daemon
carries on. A write command whose peer hung up before it was read (its
client gave up on a frozen master) is dropped, not carried out late. When
``max_connections`` are open, a new authorised peer takes
the slot of the connection idle the longest (no drain --wait, no reply
pending; a stalled half line counts as idle): idle peers cannot lock
``pulsectl`` or the API's health check out. Only when every connection is busy do new peers wait in the
backlog for up to FULL_GRACE, then get ``busy``.

Peers are checked with SO_PEERCRED when they connect: root, the daemon's own
user and members of ``group`` may talk; anyone else gets ``forbidden``.

The master wires it up as::

    server = ControlServer(config.daemon.socket_path, supervisor,
                           group=config.daemon.socket_group)
    server.open()                       # SocketInUse if another pulsed answers
    server.register(selector)
    while running:
        for key, _ in selector.select(timeout):
            key.data()                  # every callback is zero-argument
        server.tick(time.monotonic())
    server.close()

and a forked child calls ``close_in_child()`` (never ``close()``).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import select
import selectors
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pulsed.control import protocol
from pulsed.control.commands import ControlCommands, ControlTarget, _Wait
from pulsed.control.protocol import (BAD_REQUEST, BUSY, FAILED, FORBIDDEN, INTERNAL,
                                     SHUTTING_DOWN, ControlError, error_reply)
from pulsed.control.socket_file import (MAX_SOCKET_PATH, ControlSocketError, Peer, PeerPolicy,
                                        SocketInUse, check_existing, peer_credentials, publish,
                                        resolve_group, unlink_if_ours)
from pulsed.errors import PulseError

__all__ = ["ControlServer", "ControlSocketError", "ControlTarget", "Peer", "SocketInUse",
           "peer_credentials"]

log = logging.getLogger(__name__)

RECV_CHUNK = 64 * 1024
READ_BUDGET = 4 * RECV_CHUNK  # bytes read per callback: one peer cannot hog the loop
ACCEPT_BUDGET = 64  # connections accepted per callback
WRITE_HIGH_WATER = 1024 * 1024  # stop reading a peer that does not read its replies
ACCEPT_PAUSE = 1.0  # seconds without accepting after EMFILE and the like
FULL_GRACE = 1.0  # seconds the table may stay full before new peers get "busy"


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    fd: int
    peer: Peer
    last_active: float
    rbuf: bytearray = field(default_factory=bytearray)
    wbuf: bytearray = field(default_factory=bytearray)
    wait: _Wait | None = None
    eof: bool = False  # the peer will send nothing more
    closing: bool = False  # close once wbuf is flushed
    closed: bool = False
    events: int = 0  # what the selector watches (0: not registered)


class ControlServer(ControlCommands):
    def __init__(self, path: Path | str, target: ControlTarget, *, group: str | None = None,
                 mode: int = 0o660, max_line: int = protocol.MAX_LINE,
                 idle_timeout: float = 30.0, max_connections: int = 64,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.target = target
        self.group = group
        self.mode = mode
        self.max_line = max_line
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._clock = clock  # tick(now) must be given times from this clock
        self._policy = PeerPolicy(None, clock)
        self._listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._selector: selectors.BaseSelector | None = None
        self._listening = False  # the listener is registered with the selector
        self._accept_paused_until: float | None = None  # or until a connection closes
        self._full_since: float | None = None  # when every connection slot was taken
        self._closing = False
        self._conns: dict[int, _Connection] = {}
        self._handlers: dict[str, Callable[..., Mapping[str, Any] | None]] = \
            self.command_handlers()

    # -- life cycle -----------------------------------------------------------------

    def open(self) -> None:
        """Publish the socket at ``path``: bind a temporary name, set its mode
        and group, listen, then rename it over ``path`` in one step."""
        if self._listener is not None:
            raise ControlSocketError(f"control socket {self.path} is already open")
        gid = resolve_group(self.group)
        self._policy = PeerPolicy(gid, self._clock)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        check_existing(self.path)
        # Short: the temporary name must fit AF_UNIX's 107 bytes wherever the
        # final one does.
        temp = self.path.parent / f".{secrets.token_hex(3)}"
        for candidate in (self.path, temp):
            if len(os.fsencode(candidate)) > MAX_SOCKET_PATH:
                raise ControlSocketError(f"control socket path {candidate} is longer than "
                                         f"{MAX_SOCKET_PATH} bytes; choose a shorter daemon.socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            publish(sock, temp, self.path, self.mode, gid)
            info = os.stat(self.path)
        except OSError as exc:
            sock.close()
            raise ControlSocketError(f"cannot open control socket {self.path}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        self._identity = (info.st_dev, info.st_ino)
        self._listener = sock
        self._closing = False
        log.info("control socket listening on %s", self.path)

    def register(self, selector: selectors.BaseSelector) -> None:
        """Watch the listening socket (and, later, each connection) on ``selector``;
        each key's data is a zero-argument callable to call when the fd is ready."""
        if self._listener is None:
            raise ControlSocketError(f"control socket {self.path} is not open")
        self._selector = selector
        self._listen(True)

    def tick(self, now: float) -> None:
        """Finish waits that are done or timed out, close idle peers, resume accepting."""
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._guard(self._resume_accepting)
        for conn in list(self._conns.values()):
            self._guard(self._tick_connection, conn, now)

    def close(self) -> None:
        """Close every connection (a pending wait gets shutting_down) and the
        listener, and remove the socket file if it is still ours."""
        self._closing = True
        for conn in list(self._conns.values()):
            if conn.wait is not None and not conn.closed:
                conn.wait = None
                self._guard(self._send, conn, error_reply(
                    SHUTTING_DOWN, "pulsed stopped before the wait ended"))
            elif conn.wbuf and not conn.closed:
                self._guard(self._flush, conn)
            self._close(conn)
        if self._listener is not None:
            self._guard(self._listen, False)
            self._listener.close()
            self._listener = None
            unlink_if_ours(self.path, self._identity)
        self._selector = None

    def close_in_child(self) -> None:
        """In a forked child: close the inherited sockets, and nothing else.

        The selector (an epoll instance shared with the master) and the socket
        file belong to the master; touching either would break its server.
        """
        for conn in self._conns.values():
            conn.closed = True
            conn.sock.close()
        self._conns.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._selector = None

    @property
    def connections(self) -> int:
        return len(self._conns)

    # -- accepting ----------------------------------------------------------------------

    def _listen(self, on: bool) -> None:
        if self._selector is None or self._listener is None or on == self._listening:
            return
        if on:
            self._selector.register(self._listener, selectors.EVENT_READ, self._on_accept)
            self._listening = True
            return
        self._listening = False
        try:
            self._selector.unregister(self._listener)
        except (KeyError, ValueError, OSError):
            pass  # the master closed its selector first

    def _on_accept(self) -> None:
        try:
            for _ in range(ACCEPT_BUDGET):
                if self._listener is None:
                    return
                if self._full() and self._oldest_idle() is None and not self._full_for_long():
                    # Every connection is busy. Leave peers in the backlog: slots
                    # often free within a loop iteration (a burst of dropped
                    # connections reads as EOFs).
                    self._pause_accepting(FULL_GRACE)
                    return
                try:
                    sock, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: stop the loop spinning
                    if exc.errno in (errno.EMFILE, errno.ENFILE) and self._free_an_fd(exc):
                        continue
                    log.warning("control socket: cannot accept (%s); pausing %gs",
                                exc, ACCEPT_PAUSE)
                    self._pause_accepting(ACCEPT_PAUSE)
                    return
                self._admit(sock)
        except Exception:
            log.exception("control socket: unexpected error while accepting")

    def _free_an_fd(self, exc: OSError) -> bool:
        """Out of file descriptors: close the connection idle the longest, as
        when max_connections are open. Below that many, idle peers (never a
        request) held every fd the master had, and pulsectl waited in the
        backlog until they timed out (idle_timeout). False: none is idle."""
        conn = self._oldest_idle()
        if conn is None:
            return False
        log.warning("control socket: cannot accept (%s) with %d connections open; closing "
                    "the one of pid %d, idle %.1fs", exc, len(self._conns), conn.peer.pid,
                    self._clock() - conn.last_active)
        self._close(conn)
        return True

    def _pause_accepting(self, seconds: float) -> None:
        """Stop watching the listener (a ready listener left unaccepted would spin
        the loop) until ``seconds`` pass or a connection closes."""
        self._listen(False)
        self._accept_paused_until = self._clock() + seconds

    def _resume_accepting(self) -> None:
        self._accept_paused_until = None
        if not self._closing:
            self._listen(True)

    def _full_for_long(self) -> bool:
        """Whether every slot has been taken for FULL_GRACE: turn new peers away."""
        now = self._clock()
        if self._full_since is None:
            self._full_since = now
        return now - self._full_since >= FULL_GRACE

    def _admit(self, sock: socket.socket) -> None:
        try:
            sock.setblocking(False)
            peer = peer_credentials(sock)
        except OSError as exc:
            log.warning("control socket: dropping a peer: %s", exc)
            sock.close()
            return
        if not self._policy.allowed(peer):
            log.warning("control socket: refused uid %d (pid %d): not root, the daemon's "
                        "user or in its group", peer.uid, peer.pid)
            _reject(sock, FORBIDDEN, f"uid {peer.uid} may not use this control socket "
                                     "(root, the daemon's user or its socket group only)")
        elif self._full() and not self._evict_oldest_idle(peer):
            log.warning("control socket: refused pid %d: %d connections already open "
                        "and busy", peer.pid, len(self._conns))
            _reject(sock, BUSY, f"too many control connections ({self.max_connections}); "
                                "try again")
        else:
            conn = _Connection(sock, sock.fileno(), peer, self._clock())
            self._conns[conn.fd] = conn
            self._update(conn)

    def _full(self) -> bool:
        return len(self._conns) >= self.max_connections

    def _oldest_idle(self) -> _Connection | None:
        """The connection idle the longest among those not being served (no
        drain --wait, no reply pending). A part of a line read counts as idle:
        a peer that stalls mid-request must not keep its slot either."""
        idle = [conn for conn in self._conns.values()
                if conn.wait is None and not (conn.wbuf or conn.closing)]
        return min(idle, key=lambda conn: conn.last_active, default=None)

    def _evict_oldest_idle(self, newcomer: Peer) -> bool:
        """Close the connection idle the longest to make room for ``newcomer``
        (authorised already: a stranger evicts nobody). False: none is idle."""
        conn = self._oldest_idle()
        if conn is None:
            return False
        log.info("control socket: %d connections open; closing the one of pid %d, idle "
                 "%.1fs, to serve pid %d", len(self._conns), conn.peer.pid,
                 self._clock() - conn.last_active, newcomer.pid)
        self._close(conn)
        return True

    # -- one connection ------------------------------------------------------------------

    def _on_ready(self, conn: _Connection) -> None:
        """The fd is readable or writable: flush what is pending, read what came."""
        try:
            if conn.wbuf:
                self._flush(conn)
            if not conn.closed and conn.events & selectors.EVENT_READ:
                self._read(conn)
            self._update(conn)
        except Exception:
            log.exception("control socket: unexpected error serving pid %d", conn.peer.pid)
            self._close(conn)

    def _read(self, conn: _Connection) -> None:
        budget = READ_BUDGET
        while budget > 0 and not (conn.closed or conn.closing or conn.eof):
            try:
                data = conn.sock.recv(RECV_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNRESET and the like: the peer is gone
                self._close(conn)
                return
            conn.last_active = self._clock()
            if not data:
                conn.eof = True
            conn.rbuf += data
            budget -= len(data)
            self._process(conn)
            if len(conn.wbuf) >= WRITE_HIGH_WATER:
                return

    def _process(self, conn: _Connection) -> None:
        """Handle each complete line, in order; a pending wait holds the rest back."""
        while conn.wait is None and not (conn.closing or conn.closed):
            index = conn.rbuf.find(b"\n", 0, self.max_line + 1)
            if index < 0:
                break
            line = bytes(conn.rbuf[:index])
            del conn.rbuf[:index + 1]
            self._handle(conn, line)
        if conn.closing or conn.closed:
            return
        if len(conn.rbuf) > self.max_line:
            if conn.wait is not None:  # a client piling requests behind a wait
                self._close(conn)
                return
            conn.rbuf.clear()
            self._send(conn, error_reply(BAD_REQUEST, f"line too long (the limit is "
                                                      f"{self.max_line} bytes)"))
            conn.closing = True
        elif conn.eof and conn.wait is None:
            if conn.rbuf:  # a last request without its newline
                line = bytes(conn.rbuf)
                conn.rbuf.clear()
                self._handle(conn, line)
            if conn.wait is None:
                conn.closing = True

    def _handle(self, conn: _Connection, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            request = protocol.parse_request(line)
            reply = self._dispatch(conn, request)
        except ControlError as exc:
            reply = error_reply(exc.code, exc.message)
        except PulseError as exc:  # an expected failure: its message is for the operator
            log.warning("control command %.200r failed: %s", line, exc)
            reply = error_reply(FAILED, str(exc))
        except Exception:
            log.exception("control command failed: %.200r", line)
            reply = error_reply(INTERNAL, "the command failed inside pulsed; see its log")
        if reply is not None:
            self._send(conn, reply)

    def _send(self, conn: _Connection, reply: Mapping[str, Any]) -> None:
        try:
            data = protocol.encode(reply)
        except (TypeError, ValueError) as exc:
            log.error("control reply cannot be encoded as JSON: %s", exc)
            data = protocol.encode(error_reply(INTERNAL, "the reply could not be encoded "
                                                         "as JSON; see pulsed's log"))
        conn.wbuf += data
        self._flush(conn)

    def _flush(self, conn: _Connection) -> None:
        while conn.wbuf and not conn.closed:
            try:
                sent = conn.sock.send(conn.wbuf, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EPIPE, ECONNRESET: the peer is gone
                self._close(conn)
                return
            del conn.wbuf[:sent]
            conn.last_active = self._clock()

    def _update(self, conn: _Connection) -> None:
        """Close a finished connection, or watch the events it now needs."""
        if conn.closed:
            return
        if conn.closing and not conn.wbuf:
            self._close(conn)
            return
        events = 0
        if not (conn.closing or conn.eof) and len(conn.wbuf) < WRITE_HIGH_WATER:
            events |= selectors.EVENT_READ
        if conn.wbuf:
            events |= selectors.EVENT_WRITE
        if events == conn.events or self._selector is None:
            return
        if conn.events == 0:
            self._selector.register(conn.sock, events, partial(self._on_ready, conn))
        elif events == 0:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, partial(self._on_ready, conn))
        conn.events = events

    def _tick_connection(self, conn: _Connection, now: float) -> None:
        if conn.closed:
            return
        if conn.wait is not None:
            if self._finish_wait(conn, now):
                self._process(conn)  # requests that queued behind the wait
                self._update(conn)
        elif now - conn.last_active > self.idle_timeout:
            log.debug("control socket: closing idle connection of pid %d", conn.peer.pid)
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.fd, None)
        if conn.events and self._selector is not None:
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        conn.events = 0
        conn.sock.close()
        if len(self._conns) < self.max_connections:
            self._full_since = None
            if self._accept_paused_until is not None:  # a slot (and an fd) is free again
                self._resume_accepting()

    @staticmethod
    def _hung_up(conn: _Connection) -> bool:
        """Has the peer closed its end entirely (POLLHUP)? A peer that only
        shut down its writing side (socat, nc -N) still reads the reply."""
        poller = select.poll()
        poller.register(conn.fd, select.POLLIN)
        return any(events & select.POLLHUP for _, events in poller.poll(0))

    def _guard(self, func: Callable[..., Any], *args: Any) -> None:
        try:
            func(*args)
        except Exception:
            log.exception("control socket: unexpected error in %s", func.__name__)

def _reject(sock: socket.socket, code: str, message: str) -> None:
    """Best effort: one error line to a peer we will not serve, then close."""
    try:
        sock.send(protocol.encode(error_reply(code, message)), socket.MSG_NOSIGNAL)
    except OSError:
        pass
    sock.close()


