"""The HTTP API's server: asyncio (on uvloop) on one thread reads and writes every
connection (httptools parses them, see wire.py), and the endpoints run on a small
pool of threads with a short pool of database connections; but a small
`POST /jobs` of one job is checked and answered on the event loop, and
inserted by the enqueue group (enqueue_group.py) with the requests that
arrived with it.

Slow clients cost a socket, not a thread: a request is read completely
(within its deadline) before a thread touches it. At most MAX_CONNECTIONS
connections are open; a new one takes the place of the connection that has
waited longest for its request (idle, trickling a request, or lingering),
so slow clients cannot lock normal ones out. Only when every connection has
a request being answered does a newcomer get 503. The daemon's "api" child
that runs it is in child.py."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import psycopg
import uvloop
from psycopg_pool import ConnectionPool

from pulsed.config import Config
from pulsed.db.connect import connect_kwargs
from pulsed.errors import ConfigError
from pulsed.http.endpoints import (MAX_BULK_BODY_BYTES, MAX_JOB_BODY_BYTES, PUBLIC, Api,
                                   StatusSource, route)
from pulsed.http.enqueue_group import EnqueueGroup
from pulsed.http.guard import HostPolicy
from pulsed.http.long_poll import JobEnds
from pulsed.http.messages import HttpError, Request, Response, json_response
from pulsed.http.wire import Head, HttpConnection, Limits, raw_response
from pulsed.listener import parse_listen

log = logging.getLogger("pulsed.http")

MAX_BODY_BYTES = MAX_JOB_BODY_BYTES  # every body but POST /jobs's arrays
MAX_CONNECTIONS = 256  # open connections (a socket each, no thread); see the docstring
# requests answered at once; the rest wait their turn (a small POST /jobs
# takes none: the event loop and the enqueue group answer it)
HANDLER_THREADS = 16
REQUEST_TIMEOUT_S = 10.0  # a whole request (head and body) from its first byte; then 408
KEEPALIVE_TIMEOUT_S = 15.0  # an idle kept-alive connection is closed after this
WRITE_TIMEOUT_S = 15.0  # a client that does not read its response is dropped
LOOP_BODY_BYTES = 64 * 1024  # a single job's body up to this is parsed on the event loop
# for handler threads; with the enqueue group's and the long polls' own, 8 in all
POOL_SIZE = 6
POOL_TIMEOUT_S = 5.0  # waiting for a database connection; then 503
LINGER_S = 2.0  # after refusing an unread body, drop what still comes for this long
LINGER_BYTES = 4 * MAX_BODY_BYTES  # ... or up to this much
STOP_GRACE_S = 3.0  # requests in flight get this long when the API stops
ENQUEUER_CLOSE_S = 15.0  # then the enqueue group's last commit (the api role's
#                           statement_timeout is 10 s where no pooler is in between)
LISTEN_BACKLOG = 128
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
BUSY_RESPONSE = raw_response(json_response(503, HttpError(
    503, "unavailable", "too many connections; try again").body(), **{"Retry-After": "1"}),
    close=True)


@dataclass(frozen=True)
class _Admitted:
    name: str  # the endpoint
    request: Request  # without its body yet


class _App:
    """What each request may do (admit, from its head alone) and its answer
    (respond: on a handler thread, or for one small job the enqueue group)."""

    def __init__(self, api: Api, policy: HostPolicy, *, tokens: tuple[str, ...], max_body: int,
                 max_bulk_body: int, executor: ThreadPoolExecutor, job_ends: JobEnds) -> None:
        self.api, self.policy, self.tokens, self.max_body = api, policy, tokens, max_body
        self.max_bulk_body = max_bulk_body
        self.executor = executor
        self.job_ends = job_ends

    def admit(self, head: Head) -> _Admitted:
        """Every check that needs no body, so a refused client sends none."""
        if head.method not in KNOWN_METHODS:
            raise HttpError(501, "not_implemented", f"method {head.method[:40]!r} is not "
                            "supported")
        self.policy.check_host(head.headers)
        if not head.target.startswith("/"):
            raise HttpError(400, "invalid_argument", "the request target must be a path "
                            "(origin-form, like /jobs)", "target")
        # not urlsplit(): it reads "//healthz/jobs" as a host and the path
        # /jobs, past a proxy's rules for the path as sent
        path, _, query = head.target.partition("?")
        name, params = route(head.method, path)
        length = self._content_length(head.headers, name)
        if name not in PUBLIC:
            self._check_token(head.headers)
        self.policy.check_write(head.method, head.headers, has_body=length > 0)
        return _Admitted(name, Request(head.method, path, params, query, head.headers, b""))

    def _content_length(self, headers: Mapping[str, str], name: str) -> int:
        if "Transfer-Encoding" in headers:
            raise HttpError(411, "length_required", "send the body with Content-Length "
                            "(chunked transfer encoding is not supported)")
        length = int(headers.get("Content-Length", "0"))  # the parser checked it is one integer
        # POST /jobs may carry an array of jobs; create_job checks a single
        # job's body against max_body once it sees which it is
        limit = self.max_bulk_body if name == "create_job" else self.max_body
        if length > limit:
            raise HttpError(413, "payload_too_large", f"the body is {length} bytes; the "
                            f"limit is {limit}" + (" (an array of jobs)" if limit != self.max_body
                                                   else ""))
        return length

    def _check_token(self, headers: Mapping[str, str]) -> None:
        if not self.tokens:
            return
        scheme, _, given = (headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not any(_same(given.strip(), t) for t in self.tokens):
            raise HttpError(401, "unauthorized", "a valid bearer token is required "
                            "(Authorization: Bearer <api.token>)")

    async def respond(self, admitted: _Admitted, body: bytes) -> Response:
        request = replace(admitted.request, body=body)
        loop = asyncio.get_running_loop()
        if admitted.name == "get_job":  # a long poll waits here, not on a thread
            return await self._guarded(admitted, self.api.get_job_async(
                request, self.job_ends, functools.partial(loop.run_in_executor, self.executor)))
        if admitted.name == "create_job" and _small_object(body) and self.api.enqueuer:
            # the hot path: parsed and answered here, inserted by the enqueue
            # group; two thread hand-offs fewer than a handler thread's
            return await self._guarded(admitted, self.api.create_job_async(request))
        return await loop.run_in_executor(self.executor, self._call, admitted.name, request)

    async def _guarded(self, admitted: _Admitted, answer: Awaitable[Response]) -> Response:
        try:
            return await answer
        except Exception:  # noqa: BLE001 - a bug: as _call
            log.exception("api: %s %s failed", admitted.request.method,
                          admitted.request.path[:200])
            return _internal_error()

    def _call(self, name: str, request: Request) -> Response:
        try:
            return self.api.handle(name, request)
        except Exception:  # noqa: BLE001 - a bug: log it, tell the client nothing more
            log.exception("api: %s %s failed", request.method, request.path[:200])
            return _internal_error()


def _internal_error() -> Response:
    return json_response(500, HttpError(500, "internal", "internal error; the daemon's log has "
                                        "the details").body())


def _small_object(body: bytes) -> bool:
    """One job, small enough to parse on the event loop without holding up
    the other connections (arrays and large payloads go to a thread)."""
    return len(body) <= LOOP_BODY_BYTES and body.lstrip()[:1] == b"{"


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                               expected.encode("utf-8", "surrogateescape"))


class _Listener:
    """The accepting side, on the event loop: the table of open connections."""

    def __init__(self, app: _App, limits: Limits, max_connections: int) -> None:
        self.app, self.limits, self.max_connections = app, limits, max_connections
        self.connections: set[HttpConnection] = set()
        self.server: asyncio.AbstractServer | None = None

    async def on_connect(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self.connections) >= self.max_connections and not self._make_room():
            writer.write(BUSY_RESPONSE)
            writer.close()
            return
        conn = HttpConnection(reader, writer, self.app, self.limits)
        self.connections.add(conn)
        try:
            await conn.serve()
        except Exception:  # noqa: BLE001 - one connection's bug must not end the loop
            log.exception("api: a connection failed")
        finally:
            self.connections.discard(conn)
            writer.close()

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for its request; False
        when every connection has a request being answered."""
        waiting = [conn for conn in self.connections if not conn.busy]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda conn: (conn.waiting_since, conn.serial))
        log.debug("api: %d connections open; closing one that waited %.1fs for its request",
                  len(self.connections), asyncio.get_running_loop().time() - oldest.waiting_since)
        self.connections.discard(oldest)
        oldest.abort()
        return True

    def busy(self) -> int:
        return sum(1 for conn in self.connections if conn.busy)

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, give requests in flight ``grace`` seconds, close the rest."""
        if self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.busy() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()


@contextlib.contextmanager
def live_connection(pool: ConnectionPool) -> Iterator[psycopg.Connection[Any]]:
    """pool.connection(), passing over dead connections at once. After a
    server restart, a failover or idle_session_timeout every idle one is
    dead, and psycopg_pool's own check= waits 1, 2, 4 s between failed
    checks: the next request answered 503 after POOL_TIMEOUT_S with the
    database up. A dead one is given back (the pool drops it) and the next
    taken; with none idle the pool opens a new one."""
    deadline = time.monotonic() + POOL_TIMEOUT_S
    failure: psycopg.Error | None = None
    for _ in range(POOL_SIZE + 1):
        conn = pool.getconn(timeout=max(deadline - time.monotonic(), 0.0))
        try:
            ConnectionPool.check_connection(conn)
        except psycopg.Error as exc:
            pool.putconn(conn)
            failure = exc
            continue
        except BaseException:
            pool.putconn(conn)
            raise
        try:
            with conn:
                yield conn
        finally:
            pool.putconn(conn)
        return
    assert failure is not None
    raise failure


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiServer:
    """The API on its own thread: start() binds and serves, stop() ends it."""

    def __init__(self, config: Config, dsn: str, *, status_source: StatusSource | None = None,
                 board: Any = None, max_body: int = MAX_BODY_BYTES,
                 max_bulk_body: int = MAX_BULK_BODY_BYTES,
                 request_timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.config = config
        host, _port, _family = parse_listen(config.api.listen)
        if not (config.api.token or config.api.tokens) and not is_loopback(host):
            raise ConfigError("api.token", f"must be set when api.listen "
                                           f"({config.api.listen!r}) is not a loopback address")
        self.dsn = dsn
        self.connect_kwargs = connect_kwargs(dsn, "api", pooler=config.database.pooler)
        # None kept open when idle: the enqueue group keeps a connection of
        # its own once a job came (enqueue_group.py), the long polls' watcher
        # one while they come (long_poll.py)
        self.pool = ConnectionPool(
            dsn, min_size=0, max_size=POOL_SIZE, timeout=POOL_TIMEOUT_S, open=False,
            name="pulse-api", kwargs=self.connect_kwargs)
        # Reads need a token when api.token is set or the API is off
        # loopback; named tokens alone on loopback guard only the actions.
        self.reads_open = not config.api.token and is_loopback(host)
        self.enqueuer: EnqueueGroup | None = None  # started with the server
        self.api = Api(config, functools.partial(live_connection, self.pool), status_source=status_source, board=board,
                       reads_open=self.reads_open, max_job_body=max_body,
                       max_bulk_body=max_bulk_body)
        self.max_body, self.max_bulk_body = max_body, max_bulk_body
        self.limits = Limits(max_body=max(max_body, max_bulk_body), request_timeout=request_timeout,
                             keepalive_timeout=KEEPALIVE_TIMEOUT_S, write_timeout=WRITE_TIMEOUT_S,
                             linger=LINGER_S, linger_bytes=LINGER_BYTES)
        self.sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: _Listener | None = None
        self._thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._job_ends: JobEnds | None = None

    def bind(self, listener: socket.socket | None = None) -> None:
        """Listen on api.listen (raises OSError, e.g. EADDRINUSE, here and
        now), or serve on `listener`: the master's socket, bound already,
        which outlives this child so a reload refuses no connection."""
        if listener is not None:
            self.sock = listener
            return
        host, port, family = parse_listen(self.config.api.listen)
        self.sock = socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)

    def start(self) -> "ApiServer":
        if self.sock is None:
            self.bind()
        assert self.sock is not None
        self.pool.open(wait=False)
        self._executor = ThreadPoolExecutor(HANDLER_THREADS, thread_name_prefix="pulse-api")
        # uvloop (libuv under asyncio's API): the loop's own share of a
        # request (selector, handles, transports, timers) in C; ~15% less of
        # the API child's CPU per POST /jobs, and the 404 path ~20% (W7)
        self._loop = uvloop.new_event_loop()
        self.enqueuer = self.api.enqueuer = EnqueueGroup(
            self._loop, functools.partial(psycopg.AsyncConnection.connect, self.dsn,
                                          **self.connect_kwargs))
        bound_host = parse_listen(self.config.api.listen)[0]
        policy = HostPolicy(bound_host, allowed_hosts=self.config.api.allowed_hosts)
        secrets = tuple(t for t in (self.config.api.token,
                                    *(secret for _, secret in self.config.api.tokens)) if t)
        self._job_ends = JobEnds(functools.partial(psycopg.AsyncConnection.connect, self.dsn,
                                                   **self.connect_kwargs))
        app = _App(self.api, policy, tokens=() if self.reads_open else secrets,
                   max_body=self.max_body, max_bulk_body=self.max_bulk_body,
                   executor=self._executor, job_ends=self._job_ends)
        self._listener = _Listener(app, self.limits, MAX_CONNECTIONS)
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="pulse-api",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def _serve(self, ready: threading.Event) -> None:
        assert self._loop is not None and self._listener is not None
        loop, listener = self._loop, self._listener
        asyncio.set_event_loop(loop)
        try:
            listener.server = loop.run_until_complete(asyncio.start_server(
                listener.on_connect, sock=self.sock))
        finally:
            ready.set()
        loop.run_forever()
        # Requests still on a handler thread past the grace: end their tasks
        # here rather than let a closed loop destroy them pending.
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    @property
    def url(self) -> str:
        assert self.sock is not None
        host, port = self.sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop accepting, give requests in flight `grace` seconds, close."""
        loop, listener = self._loop, self._listener
        self._loop = self._listener = None  # a second stop() only closes what is left
        if loop is not None and listener is not None and self._thread is not None:
            if self._job_ends is not None:  # long polls answer now, not after the grace
                loop.call_soon_threadsafe(self._job_ends.close)
            done = asyncio.run_coroutine_threadsafe(listener.shutdown(grace), loop)
            done.result(timeout=grace + STOP_GRACE_S)
            if self.enqueuer is not None:
                # commits what is waiting: a request past the grace too
                closed = asyncio.run_coroutine_threadsafe(self.enqueuer.close(), loop)
                try:
                    closed.result(timeout=ENQUEUER_CLOSE_S)
                except TimeoutError:
                    log.warning("api: the enqueue group's last commit took over %gs; "
                                "stopping without its answer", ENQUEUER_CLOSE_S)
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join()
        if self.sock is not None:
            self.sock.close()  # closed already when served; not when only bound
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self.enqueuer = None
        self.pool.close()

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
