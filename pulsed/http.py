"""The HTTP API (SPEC §7): jobs over HTTP, health, metrics and a status page.

    POST /jobs                 {"type": "email", "payload": {...}, "priority": 1, ...}
                               201 with the job; an idempotent repeat: 200, same job
    GET  /jobs/{id}            the job with its attempts
    GET  /jobs?state=&type=&limit=&after=
                               newest first; pass "next_after" as `after` for the next page
    POST /jobs/{id}/cancel     200 with the job; 404; 409 if it already finished
    POST /jobs/{id}/retry      200 with the job; 404; 409 if it is running or available
    GET  /healthz              200 or 503: database reachable, leader known, workers up
    GET  /metrics              Prometheus text, every process of the daemon merged
    GET  /                     the status page; GET /status.json is what it shows
    GET  /openapi.json         this API in OpenAPI 3

Every error is JSON: {"error": {"code": ..., "message": ..., "field": ...}};
a bug gives 500 "internal" with the traceback in the log, never in the reply.
With api.token set, every endpoint but /, /healthz and /openapi.json wants
"Authorization: Bearer <token>" (compared in constant time).

The daemon runs it in its "api" child (`api_main`); tests and embedders run
`ApiServer(config, dsn)` in-process. The stdlib ThreadingHTTPServer is
enough here: one thread per connection, at most MAX_CONNECTIONS at once
(beyond that a 503), a short pool of database connections, bounded bodies.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
from psycopg_pool import ConnectionPool

import pulsed
from pulsed.serialize import job_to_dict
from pulsed import metrics
from pulsed.api import MAX_PAYLOAD_BYTES, job_params
from pulsed.board import ChildState
from pulsed.children import ChildRuntime, boot_failed, exit_code_for
from pulsed.config import Config
from pulsed.control.client import ControlClient
from pulsed.db.store import BACKGROUND_SESSION, Store, session_options
from pulsed.errors import ConfigError, JobInputError, PulseError
from pulsed.jobs import JobState

log = logging.getLogger(__name__)

MAX_BODY_BYTES = MAX_PAYLOAD_BYTES + 64 * 1024  # the largest payload, plus the envelope
MAX_CONNECTIONS = 64  # open connections (one thread each); more get 503
SOCKET_TIMEOUT_S = 15.0  # an idle or slow connection is closed after this
POOL_SIZE = 4
POOL_TIMEOUT_S = 5.0  # waiting for a database connection; then 503
STATEMENT_TIMEOUT_MS = 10_000
STATUS_TIMEOUT_S = 2.0  # asking the master for its status
DEFAULT_LIMIT, MAX_LIMIT = 50, 1000
FAILURES_SHOWN = 10
MAX_QUERY_FIELDS = 50
MAX_ID = 2**63 - 1
LINGER_S = 2.0  # after refusing an unread body, drop what still comes for this long
LINGER_BYTES = 4 * MAX_BODY_BYTES  # ... or up to this much
STOP_GRACE_S = 3.0  # requests in flight get this long when the API stops
JOB_FIELDS = ("type", "payload", "priority", "queue", "delay", "run_at", "max_attempts",
              "idempotency_key", "timeout")
CANCELLABLE = ("scheduled", "available", "running", "retryable")
RETRYABLE = ("completed", "failed", "cancelled", "retryable", "scheduled")
PUBLIC = frozenset({"page", "healthz", "openapi"})  # no token needed: they hold no job data
HTML_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
                "base-uri 'none'; frame-ancestors 'none'", "X-Frame-Options": "DENY"}

StatusSource = Callable[[], Mapping[str, Any]]


class HttpError(PulseError):
    """A request failed; the client gets status and a JSON error."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 **extra: Any) -> None:
        self.status, self.code, self.message, self.field = status, code, message, field
        self.extra = extra
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field,
                          **self.extra}}


def _invalid(field: str | None, message: str) -> HttpError:
    return HttpError(400, "invalid_argument", message, field)


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, data: Any, **headers: str) -> Response:
    text = json.dumps(data, ensure_ascii=False, default=str, allow_nan=False)
    return Response(status, text.encode(), headers=dict(headers))


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: dict[str, str]  # from the path: {"id": "42"}
    query: str
    headers: Mapping[str, str]
    body: bytes


# -- the endpoints ----------------------------------------------------------------


ROUTES: tuple[tuple[re.Pattern[str], dict[str, str]], ...] = tuple(
    (re.compile(pattern), methods) for pattern, methods in (
        (r"/", {"GET": "page"}),
        (r"/status\.json", {"GET": "status"}),
        (r"/healthz", {"GET": "healthz"}),
        (r"/metrics", {"GET": "metrics_text"}),
        (r"/openapi\.json", {"GET": "openapi"}),
        (r"/jobs", {"GET": "list_jobs", "POST": "create_job"}),
        (r"/jobs/(?P<id>[^/]+)", {"GET": "get_job"}),
        (r"/jobs/(?P<id>[^/]+)/cancel", {"POST": "cancel_job"}),
        (r"/jobs/(?P<id>[^/]+)/retry", {"POST": "retry_job"}),
    ))


def route(method: str, path: str) -> tuple[str, dict[str, str]]:
    """The endpoint's name and path parameters; 404 or 405 otherwise."""
    path = path.rstrip("/") or "/"
    for pattern, methods in ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        name = methods.get("GET" if method == "HEAD" else method)
        if name is None:
            allowed = ", ".join(sorted(methods))
            raise HttpError(405, "method_not_allowed", f"{method} is not allowed on {path}; "
                            f"use {allowed}", allow=allowed)
        return name, match.groupdict()
    raise HttpError(404, "not_found", f"no endpoint at {path[:200]}")


class Api:
    """The endpoints, apart from the socket server: a Request in, a Response out."""

    def __init__(self, config: Config, connect: Callable[[], Any], *,
                 status_source: StatusSource | None = None, board: Any = None) -> None:
        self.config = config
        self.connect = connect  # () -> a connection context manager (a pool's)
        self.status_source = status_source
        self.registry = metrics.exposition_registry(
            connect=connect, node_id=config.daemon.node_id, board=board)
        static = resources.files("pulsed") / "static"
        self.page_html = (static / "status.html").read_bytes()
        self.openapi_json = (static / "openapi.json").read_bytes()

    def handle(self, name: str, request: Request) -> Response:
        try:
            return getattr(self, name)(request)
        except (JobInputError, HttpError) as exc:
            if isinstance(exc, JobInputError):
                exc = _invalid(exc.argument, f"{exc.argument} {exc.problem}")
            return json_response(exc.status, exc.body())
        except psycopg.DataError as exc:  # the database refused a value we let through
            return json_response(400, _invalid(None, f"the database refused the request: "
                                               f"{_first_line(exc)}").body())
        except psycopg.OperationalError as exc:
            log.warning("api: database unavailable: %s", _first_line(exc))
            return json_response(503, HttpError(503, "unavailable", "the database is "
                                                "unavailable; try again").body())

    # -- jobs ---------------------------------------------------------------------

    def create_job(self, request: Request) -> Response:
        options = self._job_options(_json_object(request.body))
        params = job_params(**options)
        with self.connect() as conn, conn.transaction():
            store = Store(conn)
            job_id, created = store.insert_job(params)
            record = store.get_job(job_id, with_attempts=False)
        if created:
            metrics.jobs_enqueued(params["type"], "http")
        job = job_to_dict(record) if record is not None else {"id": job_id}
        return json_response(201 if created else 200, job, Location=f"/jobs/{job_id}")

    def _job_options(self, data: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(data) - set(JOB_FIELDS))
        if unknown:
            raise _invalid(unknown[0], f"unknown field {unknown[0]!r}; a job takes "
                                       f"{', '.join(JOB_FIELDS)}")
        options = {key: value for key, value in data.items() if value is not None}
        job_type = options.get("type")
        if job_type is None:
            raise _invalid("type", "type is required (the job type, e.g. \"email\")")
        if not isinstance(job_type, str):
            raise _invalid("type", f"type must be a string, got {_json_type(job_type)}")
        if "run_at" in options:
            options["run_at"] = _timestamp("run_at", options["run_at"])
        defaults = self.config.type_config(job_type)
        for key in ("priority", "max_attempts", "timeout"):
            if key not in options and getattr(defaults, key) is not None:
                options[key] = getattr(defaults, key)
        return options

    def get_job(self, request: Request) -> Response:
        job_id = _job_id(request.params["id"])
        with self.connect() as conn:
            record = Store(conn).get_job(job_id)
        if record is None:
            raise _not_found(job_id)
        return json_response(200, job_to_dict(record))

    def list_jobs(self, request: Request) -> Response:
        query = _query(request.query)
        state = query.get("state")
        if state is not None and state not in {s.value for s in JobState}:
            raise _invalid("state", f"state must be one of {', '.join(s.value for s in JobState)}")
        job_type = query.get("type")
        if job_type is not None and (len(job_type) > 255 or "\x00" in job_type):
            raise _invalid("type", "type must be at most 255 characters, without NUL")
        limit = _int_param(query, "limit", 1, MAX_LIMIT, DEFAULT_LIMIT)
        after = _int_param(query, "after", 1, MAX_ID, None)
        with self.connect() as conn:
            records = Store(conn).list_jobs(state=state, type=job_type, after=after, limit=limit)
        next_after = records[-1].id if len(records) == limit else None
        return json_response(200, {"jobs": [job_to_dict(r) for r in records],
                                   "next_after": next_after, "limit": limit})

    def cancel_job(self, request: Request) -> Response:
        return self._change(request, Store.cancel, "cancelled", CANCELLABLE)

    def retry_job(self, request: Request) -> Response:
        return self._change(request, Store.retry, "retried", RETRYABLE)

    def _change(self, request: Request, action: Callable[[Store, int], bool], verb: str,
                allowed: tuple[str, ...]) -> Response:
        job_id = _job_id(request.params["id"])
        with self.connect() as conn:
            store = Store(conn)
            changed = action(store, job_id)
            record = store.get_job(job_id, with_attempts=False)
        if record is None:
            raise _not_found(job_id)
        if not changed:
            state = record.state.value
            raise HttpError(409, "conflict", f"job {job_id} is {state}; only "
                            f"{', '.join(allowed[:-1])} or {allowed[-1]} jobs can be {verb}",
                            state=state)
        return json_response(200, job_to_dict(record))

    # -- the node -------------------------------------------------------------------

    def healthz(self, request: Request) -> Response:
        checks: dict[str, dict[str, Any]] = {}
        try:
            with self.connect() as conn:
                leader = Store(conn).leader_get()
            checks["database"] = {"ok": True}
            live = bool(leader and leader["live"])
            checks["leader"] = {"ok": live, "node_id": _leader_node(leader) if live else None,
                                "term": leader["term"] if leader else None}
        except psycopg.Error as exc:
            checks["database"] = {"ok": False, "error": _first_line(exc)}
            checks["leader"] = {"ok": False, "error": "unknown: no database"}
        if self.status_source is not None:
            checks.update(_node_checks(*self._status()))
        healthy = all(check["ok"] for check in checks.values())
        return json_response(200 if healthy else 503,
                             {"status": "ok" if healthy else "fail", "checks": checks})

    def _status(self) -> tuple[dict[str, Any] | None, str | None]:
        if self.status_source is None:
            return None, "no daemon: this API runs outside pulsed"
        try:
            return dict(self.status_source()), None
        except PulseError as exc:
            return None, str(exc)

    def status(self, request: Request) -> Response:
        status, error = self._status()
        data: dict[str, Any] = dict(status or {})
        if error:
            data["status_error"] = error
        try:
            with self.connect() as conn:
                store = Store(conn)
                recent = store.list_jobs(state="failed", limit=FAILURES_SHOWN)
                recent += store.list_jobs(state="retryable", limit=FAILURES_SHOWN)
                if status is None:
                    data["queues"] = store.queue_depths()
                    data["oldest_available_age_s"] = store.oldest_available_age()
        except psycopg.Error as exc:
            recent = []
            data["database_error"] = _first_line(exc)
        recent.sort(key=lambda r: r.id, reverse=True)
        data["failures"] = [job_to_dict(r) for r in recent[:FAILURES_SHOWN]]
        data["generated_at"] = datetime.now(timezone.utc).isoformat()
        return json_response(200, data)

    def metrics_text(self, request: Request) -> Response:
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(200, encoder(self.registry), content_type)

    def page(self, request: Request) -> Response:
        return Response(200, self.page_html, "text/html; charset=utf-8", dict(HTML_HEADERS))

    def openapi(self, request: Request) -> Response:
        return Response(200, self.openapi_json, "application/json")


def _node_checks(status: dict[str, Any] | None, error: str | None) -> dict[str, dict[str, Any]]:
    """The master's and the workers' part of /healthz."""
    if status is None:
        return {"master": {"ok": False, "error": error},
                "workers": {"ok": False, "error": "unknown: the master did not answer"}}
    master = status.get("master") or {}
    state = master.get("state")
    up = sum(1 for c in status.get("children") or []
             if c.get("role") == "worker" and c.get("state") in ("idle", "busy", "draining"))
    desired = master.get("workers_desired")
    return {"master": {"ok": state != "stopping", "state": state},
            "workers": {"ok": up > 0 or desired == 0, "up": up, "desired": desired}}


# -- request pieces ---------------------------------------------------------------


def _json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise _invalid("body", 'the body is empty; send a JSON object like {"type": "email"}')
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, …
        raise _invalid("body", f"the body is not valid JSON: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise _invalid("body", f"the body must be a JSON object, got {_json_type(data)}")
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise _invalid("body", "the body holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                               "which is not text") from None
    return data


def _timestamp(name: str, value: Any) -> datetime:
    example = "like 2030-01-01T12:00:00Z or 2030-01-01T13:00:00+01:00"
    if not isinstance(value, str):
        raise _invalid(name, f"{name} must be an ISO 8601 string {example}, "
                             f"got {_json_type(value)}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _invalid(name, f"{name} must be an ISO 8601 timestamp {example}") from None
    if moment.tzinfo is None:
        raise _invalid(name, f"{name} needs a timezone ({example})")
    return moment


def _job_id(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 19 or not 0 < int(text) <= MAX_ID:
        raise _invalid("id", f"a job id is a positive integer, got {text[:40]!r}")
    return int(text)


def _not_found(job_id: int) -> HttpError:
    return HttpError(404, "not_found", f"no job with id {job_id}", "id")


def _query(text: str) -> dict[str, str]:
    """Query parameters; the last of repeated ones counts, blank ones are absent."""
    try:
        pairs = parse_qs(text, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise _invalid(None, f"too many query parameters (at most {MAX_QUERY_FIELDS})") from None
    return {key: values[-1] for key, values in pairs.items() if values[-1] != ""}


def _int_param(query: Mapping[str, str], name: str, low: int, high: int,
               default: int | None) -> int | None:
    text = query.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 19 and low <= int(text) <= high):
        raise _invalid(name, f"{name} must be an integer from {low} to {high}, got {text[:40]!r}")
    return int(text)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _leader_node(row: Mapping[str, Any] | None) -> str | None:
    return row["leader_id"].rsplit("/", 1)[0] if row else None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:500] if lines else type(exc).__name__


# -- the server ---------------------------------------------------------------------


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
            raise _invalid("body", f"the body ended after {len(body)} of {length} bytes")
        return body

    def _content_length(self) -> int:
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return 0
        text = values[0].strip() if len(set(values)) == 1 else ""
        if not (text.isascii() and text.isdigit()):
            self.close_connection = True
            raise _invalid("Content-Length", "Content-Length must be one non-negative integer")
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
                 token: str, max_body: int) -> None:
        self.address_family = family
        self.api, self.token, self.max_body = api, token, max_body
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.active = 0
        self.idle = threading.Condition()
        super().__init__(address, _Handler)

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


def parse_listen(listen: str) -> tuple[str, int, socket.AddressFamily]:
    """'127.0.0.1:8080', '[::1]:8080' or 'localhost:8080' -> (host, port, family)."""
    host, _, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1], int(port), socket.AF_INET6
    return host, int(port), socket.AF_INET6 if ":" in host else socket.AF_INET


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

    def bind(self) -> None:
        host, port, family = parse_listen(self.config.api.listen)
        self.httpd = _Server((host, port), family, self.api, token=self.config.api.token,
                             max_body=self.max_body)

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


# -- the "api" child ------------------------------------------------------------------


BIND_RETRY_S = 5.0  # on reload the old API child may still hold the port
LOOP_SLEEP_S = 0.2


def api_main(runtime: ChildRuntime) -> int:
    """The daemon's "api" child: serve until asked to stop."""
    ctx = runtime.ctx
    client = ControlClient(ctx.config.daemon.socket_path, timeout=STATUS_TIMEOUT_S)
    try:
        server = ApiServer(ctx.config, ctx.dsn, board=ctx.board,
                           status_source=lambda: client.request("status"))
        _bind_retrying(server, runtime)
    except (OSError, PulseError) as exc:
        return boot_failed(runtime, f"listening on api.listen {ctx.config.api.listen!r}", exc)
    server.start()
    runtime.slot.update(state=ChildState.IDLE)
    runtime.title_detail = f"api {server.url}"
    log.info("HTTP API listening on %s", server.url)
    try:
        while not runtime.should_stop():
            time.sleep(LOOP_SLEEP_S)
    finally:
        server.stop()
    return exit_code_for(runtime)


def _bind_retrying(server: ApiServer, runtime: ChildRuntime) -> None:
    deadline = time.monotonic() + BIND_RETRY_S
    while True:
        try:
            server.bind()
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline \
                    or runtime.should_stop():
                raise
            time.sleep(LOOP_SLEEP_S)
