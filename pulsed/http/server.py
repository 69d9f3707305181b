"""The HTTP API's server: the stdlib ThreadingHTTPServer, one thread per
connection, at most MAX_CONNECTIONS at once (beyond that a 503), a short
pool of database connections, bounded bodies. The daemon's "api" child
that runs it is in child.py."""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from psycopg_pool import ConnectionPool

import pulsed
from pulsed.api import MAX_PAYLOAD_BYTES
from pulsed.config import Config
from pulsed.db.store import BACKGROUND_SESSION, session_options
from pulsed.errors import ConfigError
from pulsed.http.endpoints import PUBLIC, Api, StatusSource, route
from pulsed.http.messages import HttpError, Request, Response, invalid, json_response
from pulsed.listener import parse_listen

log = logging.getLogger("pulsed.http")

MAX_BODY_BYTES = MAX_PAYLOAD_BYTES + 64 * 1024  # the largest payload, plus the envelope
MAX_CONNECTIONS = 64  # open connections (one thread each); more get 503
SOCKET_TIMEOUT_S = 15.0  # an idle or slow connection is closed after this
POOL_SIZE = 4
POOL_TIMEOUT_S = 5.0  # waiting for a database connection; then 503
STATEMENT_TIMEOUT_MS = 10_000
LINGER_S = 2.0  # after refusing an unread body, drop what still comes for this long
LINGER_BYTES = 4 * MAX_BODY_BYTES  # ... or up to this much
STOP_GRACE_S = 3.0  # requests in flight get this long when the API stops


STATUS_CODES = {400: "invalid_argument", 401: "unauthorized", 404: "not_found",
                405: "method_not_allowed", 408: "timeout", 411: "length_required",
                413: "payload_too_large", 414: "uri_too_long", 431: "headers_too_large",
                501: "not_implemented", 503: "unavailable", 505: "version_not_supported"}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = f"pulsed/{pulsed.__version__}"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_S
    linger = False  # set when a reply leaves the body unread

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def _serve(self) -> None:
        try:
            response = self._respond()
        except HttpError as exc:
            response = json_response(exc.status, exc.body(), **_extra_headers(exc))
        except Exception:  # noqa: BLE001 - a bug: log it, tell the client nothing more
            log.exception("api: %s %s failed", self.command, self.path[:200])
            self.close_connection = True
            response = json_response(500, HttpError(500, "internal", "internal error; the "
                                                    "daemon's log has the details").body())
        self._write(response)
        if self.linger:
            self._linger()

    def _linger(self) -> None:
        """After refusing a body we did not read: stop writing, then read
        and drop what the client still sends (for a while), so closing
        does not reset the connection before the client reads our reply."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_S)
            deadline, dropped = time.monotonic() + LINGER_S, 0
            while dropped < LINGER_BYTES and time.monotonic() < deadline:
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                dropped += len(chunk)
        except OSError:
            pass

    def _respond(self) -> Response:
        body = self._read_body()
        parts = urlsplit(self.path)
        name, params = route(self.command, parts.path)
        if name not in PUBLIC:
            self._check_token()
        request = Request(self.command, parts.path, params, parts.query, self.headers, body)
        return self.server.api.handle(name, request)

    def _read_body(self) -> bytes:
        """Read the whole body (a reply must not leave part of it unread)."""
        if "Transfer-Encoding" in self.headers:
            self.close_connection = self.linger = True
            raise HttpError(411, "length_required", "send the body with Content-Length "
                            "(chunked transfer encoding is not supported)")
        length = self._content_length()
        if length > self.server.max_body:
            self.close_connection = self.linger = True
            raise HttpError(413, "payload_too_large", f"the body is {length} bytes; the "
                            f"limit is {self.server.max_body}")
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            self.close_connection = True
            raise invalid("body", f"the body ended after {len(body)} of {length} bytes")
        return body

    def _content_length(self) -> int:
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return 0
        text = values[0].strip() if len(set(values)) == 1 else ""
        if not (text.isascii() and text.isdigit()):
            self.close_connection = True
            raise invalid("Content-Length", "Content-Length must be one non-negative integer")
        return int(text)

    def _check_token(self) -> None:
        expected = self.server.token
        if not expected:
            return
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not _same(given.strip(), expected):
            raise HttpError(401, "unauthorized", "a valid bearer token is required "
                            "(Authorization: Bearer <api.token>)")

    def handle_expect_100(self) -> bool:
        try:
            too_big = self._content_length() > self.server.max_body
        except HttpError:
            too_big = False  # _read_body reports it
        if too_big:
            self.close_connection = True
            self._write(json_response(413, HttpError(413, "payload_too_large", "the body is "
                        f"over the limit of {self.server.max_body} bytes").body()))
            self._linger()  # some clients send the body anyway after a while
            return False
        return super().handle_expect_100()

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """The stdlib's errors (bad request line, unknown method, …), as JSON."""
        self.close_connection = True
        text = message or self.responses.get(code, ("error",))[0]
        self._write(json_response(code, HttpError(code, STATUS_CODES.get(code, "error"),
                                                  text).body()))

    def _write(self, response: Response) -> None:
        try:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            if response.status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="pulse"')
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)
        except OSError:
            self.close_connection = True  # the client went away

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: %s %s", self.address_string(), format % args)


def _extra_headers(exc: HttpError) -> dict[str, str]:
    return {"Allow": exc.extra["allow"]} if "allow" in exc.extra else {}


def _same(given: str, expected: str) -> bool:
    import hmac
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                               expected.encode("utf-8", "surrogateescape"))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, api: Api, *,
                 token: str, max_body: int, listener: socket.socket | None = None) -> None:
        self.address_family = family
        self.api, self.token, self.max_body = api, token, max_body
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.active = 0
        self.idle = threading.Condition()
        super().__init__(address, _Handler, bind_and_activate=listener is None)
        if listener is not None:  # bound and listening already (the master's)
            self.socket.close()
            self.socket = listener
            self.server_address = listener.getsockname()
            self.server_name, self.server_port = self.server_address[:2]

    def server_bind(self) -> None:  # the stdlib's does a reverse DNS lookup here
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            _refuse_busy(request)
            self.shutdown_request(request)
            return
        with self.idle:
            self.active += 1
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()
            with self.idle:
                self.active -= 1
                self.idle.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("api: connection from %s failed", client_address, exc_info=True)

    def wait_idle(self, timeout: float) -> bool:
        with self.idle:
            return self.idle.wait_for(lambda: self.active == 0, timeout)


def _refuse_busy(request: socket.socket) -> None:
    body = json.dumps(HttpError(503, "unavailable", "too many connections; try again").body())
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    try:
        request.settimeout(1.0)
        request.sendall(head.encode() + body.encode())
    except OSError:
        pass


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiServer:
    """The API on its own threads: start() binds and serves, stop() ends it."""

    def __init__(self, config: Config, dsn: str, *, status_source: StatusSource | None = None,
                 board: Any = None, max_body: int = MAX_BODY_BYTES) -> None:
        self.config = config
        host, _port, _family = parse_listen(config.api.listen)
        if not config.api.token and not is_loopback(host):
            raise ConfigError("api.token", f"must be set when api.listen "
                                           f"({config.api.listen!r}) is not a loopback address")
        self.pool = ConnectionPool(
            dsn, min_size=1, max_size=POOL_SIZE, timeout=POOL_TIMEOUT_S, open=False,
            name="pulse-api", check=ConnectionPool.check_connection,
            kwargs={"autocommit": True, "connect_timeout": 5, "application_name": "pulse api",
                    "options": session_options(
                        dsn, f"-c statement_timeout={STATEMENT_TIMEOUT_MS} {BACKGROUND_SESSION}")})
        self.api = Api(config, self.pool.connection, status_source=status_source, board=board)
        self.max_body = max_body
        self.httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def bind(self, listener: socket.socket | None = None) -> None:
        """Listen on api.listen, or serve on `listener` (bound already)."""
        host, port, family = parse_listen(self.config.api.listen)
        self.httpd = _Server((host, port), family, self.api, token=self.config.api.token,
                             max_body=self.max_body, listener=listener)

    def start(self) -> "ApiServer":
        if self.httpd is None:
            self.bind()
        self.pool.open(wait=False)
        assert self.httpd is not None
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.2,),
                                        name="pulse-api", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        assert self.httpd is not None
        host, port = self.httpd.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop accepting, give requests in flight `grace` seconds, close."""
        if self.httpd is not None:
            if self._thread is not None:
                self.httpd.shutdown()
                self._thread.join()
            self.httpd.server_close()
            self.httpd.wait_idle(grace)
        self.pool.close()

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
