"""One HTTP/1.1 connection of the API on asyncio, parsed by httptools.

httptools binds llhttp, Node.js's parser, in its strict mode: whitespace
before a header's colon, an obs-folded line, bad or repeated Content-Length,
Content-Length beside Transfer-Encoding, a bare CR or LF and the like are
errors, not guesses. It parses in C what h11 (the parser before it) parsed
in Python: ~2 us a request against ~60, a quarter of the API child's CPU on
`POST /jobs` (bench W7). Added on top of it:

- The head is bounded (HEAD_LIMIT_BYTES, else 431), and only HTTP/1.0 and
  1.1 are spoken (else 505); a request asking to switch protocols (Upgrade,
  CONNECT) is answered as any other, then the connection closes.
- Time: a request's head and body must arrive within ``request_timeout`` of
  its first byte (of the connection, for its first request), however the
  client trickles them; waiting for the next request on a kept-alive
  connection is bounded by ``keepalive_timeout``. A late request gets 408.

The parser takes whatever arrives and calls back per request (pipelined
requests queue up as _Messages); the connection answers them one after the
other. What a request may do is the Application's business: ``admit``
looks at the head (before the connection waits for a byte of the body: the
token, the size, the origin), ``respond`` turns the admitted head and the
body into a Response. A response goes out in one write: head and body
together, so no delayed-ACK stall between two small segments. A connection
whose body was left unread (an early error) is closed after lingering, so
the client reads the error instead of a reset.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import functools
import itertools
import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import httptools

import pulsed
from pulsed.http.messages import HttpError, Response, json_response

log = logging.getLogger("pulsed.http")

HEAD_LIMIT_BYTES = 16 * 1024  # request line and headers; more is 431
READ_CHUNK = 64 * 1024
SERVER_HEADER = f"pulsed/{pulsed.__version__}".encode()
VERSIONS = frozenset({"1.0", "1.1"})
# Requests parsed ahead of their answers (pipelined): each is kept as
# objects until answered; a 64 KiB read could hold ~1,800 tiny ones.
MAX_PIPELINED = 64
# Refusals after which the rest of the stream cannot be trusted to be framed as
# the client meant (a proxy in front may have read it differently: request
# smuggling), or that end a slow client: the connection closes.
CLOSING_STATUSES = frozenset({400, 408, 411, 413, 431, 505})
# uvloop's transports raise RuntimeError ("handler is closed") for a write
# after the connection was lost, where asyncio's drop it silently
_CLOSED_TRANSPORT = RuntimeError
_SERIALS = itertools.count()
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,40}")


@dataclass(frozen=True)
class Limits:
    max_body: int
    request_timeout: float  # a whole request (head and body), from its first byte
    keepalive_timeout: float  # waiting for the next request on an open connection
    write_timeout: float  # a client that does not read its response is dropped
    linger: float  # after an early error, drop what the client still sends for this long
    linger_bytes: int  # ... or up to this much


class Headers(Mapping[str, str]):
    """A request's headers by case-insensitive name; repeated ones joined by ', '."""

    def __init__(self, pairs: list[tuple[bytes, bytes]]) -> None:
        joined: dict[str, list[str]] = {}
        for name, value in pairs:  # the parser has checked the names are tokens
            joined.setdefault(name.decode("ascii").lower(), []).append(
                value.decode("latin-1").strip(" \t"))
        self._data = {name: ", ".join(values) for name, values in joined.items()}

    def __getitem__(self, name: str) -> str:
        return self._data[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@dataclass(frozen=True)
class Head:
    """A request before its body: what admit() decides on."""

    method: str
    target: str
    headers: Headers


class Application(Protocol):
    def admit(self, head: Head) -> Any: ...  # raises HttpError; else what respond() needs
    async def respond(self, admitted: Any, body: bytes) -> Response: ...


def error_response(exc: HttpError) -> Response:
    extra = {"Allow": exc.extra["allow"]} if "allow" in exc.extra else {}
    return json_response(exc.status, exc.body(), **extra)


@dataclass(eq=False)
class _Message:
    """One request as the parser has it so far."""

    target: bytearray = field(default_factory=bytearray)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    head_bytes: int = 0  # the request line's and the whole headers' bytes
    partial_bytes: int = 0  # the bytes read while its head was not whole
    head_done: bool = False
    method: str = ""
    version: str = ""
    keep_alive: bool = False  # what the client asked for (and its HTTP version allows)
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False  # the whole body is in
    switches: bool = False  # Upgrade or CONNECT: nothing after it is read (see _switch)

    def expects_continue(self) -> bool:
        return self.version == "1.1" and not self.body and not self.complete and any(
            name.lower() == b"expect" and value.strip().lower() == b"100-continue"
            for name, value in self.headers)


class _Refused(Exception):
    """Raised in a parser callback to stop parsing (see HttpConnection._refuse)."""


def _head_too_large() -> HttpError:
    return HttpError(431, "headers_too_large", f"the request line and headers are over the "
                     f"limit of {HEAD_LIMIT_BYTES} bytes")


def _malformed(exc: httptools.HttpParserError, chunk: bytes, at_start: bool) -> HttpError:
    """The parser's refusal as the client's error. ``at_start``: the failing
    request began in ``chunk`` (so its method is at the chunk's start)."""
    reason = str(exc) or type(exc).__name__
    if "Transfer-Encoding" in reason:  # the API takes no transfer encoding at all
        return HttpError(411, "length_required", f"send the body with Content-Length "
                         f"(transfer encodings are not supported: {reason})")
    if isinstance(exc, httptools.HttpParserInvalidMethodError) and at_start:
        method = chunk.lstrip(b"\r\n").split(b" ", 1)[0]
        if _TOKEN.fullmatch(method):
            return HttpError(501, "not_implemented", f"method {method.decode()!r} is not "
                             "supported")
    return HttpError(400, "invalid_argument", f"malformed request: {reason}")


class HttpConnection:
    """Serves the requests of one client, one after the other (keep-alive)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 app: Application, limits: Limits) -> None:
        self.reader, self.writer, self.app, self.limits = reader, writer, app, limits
        self.parser = httptools.HttpRequestParser(self)  # calls the on_* methods below
        self.messages: collections.deque[_Message] = collections.deque()
        self.error: HttpError | None = None  # the request after those queued is malformed
        self.ended = False  # the client sent its last byte (EOF)
        self.switched = False  # Upgrade or CONNECT: the bytes after it are not HTTP
        self.loop = asyncio.get_running_loop()
        self.waiting_since = self.loop.time()  # when it began waiting for its request
        # uvloop's clock moves once per loop iteration: connections accepted
        # together wait "since" the same time; the older one is the first
        self.serial = next(_SERIALS)
        self.busy = False  # a request is being answered: not to be closed for room
        self._completed_in_feed = False

    def abort(self) -> None:
        """Close at once (to make room, or at shutdown)."""
        self.writer.transport.abort()

    async def serve(self) -> None:
        first = True
        while await self._exchange(first):
            first = False
            self.waiting_since = self.loop.time()

    async def _exchange(self, first: bool) -> bool:
        """Read one request and answer it; False when the connection is done."""
        message: _Message | None = None
        try:
            message, deadline = await self._read_head(first)
            if message is None:
                return False
            head = Head(message.method, message.target.decode("latin-1"),
                        Headers(message.headers))
            admitted = self.app.admit(head)
            self._continue_if_asked(message)
            body = await self._read_body(message, deadline)
            self.busy = True
            response = await self.app.respond(admitted, body)
        except HttpError as exc:
            response = error_response(exc)
        unread = message is None or not message.complete  # its body (or garbage) is left
        close = unread or not message.keep_alive or message.switches \
            or response.status in CLOSING_STATUSES or response.status >= 500
        try:
            await self._write(response, close, with_body=message is None
                              or message.method != "HEAD")
        finally:
            self.busy = False
        if unread:
            await self._linger()
        elif self.messages:
            self.messages.popleft()
        return not close

    # -- the parser's callbacks -------------------------------------------------------
    # A refusal raised in a callback stops the parser there (feed_data then
    # raises HttpParserCallbackError): what it refused is never buffered.

    def on_message_begin(self) -> None:
        if len(self.messages) >= MAX_PIPELINED:
            self._refuse(HttpError(400, "invalid_argument", f"more than {MAX_PIPELINED} "
                                   "pipelined requests at once; wait for their answers"))
        self.messages.append(_Message())

    def on_url(self, url: bytes) -> None:
        message = self.messages[-1]
        message.target += url
        self._count_head(message, len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        message = self.messages[-1]
        message.headers.append((name, value))
        self._count_head(message, len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        message = self.messages[-1]
        message.head_done = True
        message.method = self.parser.get_method().decode("ascii")
        message.version = self.parser.get_http_version()
        message.keep_alive = message.version == "1.1" and self.parser.should_keep_alive()
        self._completed_in_feed = True

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        self.messages[-1].complete = True
        self._completed_in_feed = True

    def _count_head(self, message: _Message, size: int) -> None:
        message.head_bytes += size
        if message.head_bytes > HEAD_LIMIT_BYTES:
            self.messages.pop()  # it is the error now, not a request to answer
            self._refuse(_head_too_large())

    def _refuse(self, error: HttpError) -> None:
        self.error = error
        raise _Refused

    # -- reading ----------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Parse what the client sent (b"": its end)."""
        if not data:
            self.ended = True
            return
        if self.error is not None or self.switched:
            return  # nothing after a malformed request or a protocol switch is read
        began = len(self.messages)
        in_head = bool(self.messages) and not self.messages[-1].head_done
        self._completed_in_feed = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._switch()
        except httptools.HttpParserError as exc:
            if self.error is None:  # else a callback refused (_refuse)
                at_start = not in_head and len(self.messages) == began + 1 \
                    and not self._completed_in_feed
                self.error = _malformed(exc, data, at_start)
            return
        self._bound_partial_head(data, in_head or len(self.messages) > began)

    def _switch(self) -> None:
        """Upgrade or CONNECT: the parser stops at the end of the head and
        reads no body. The request is answered as any other, then the
        connection closes; one that says it has a body is refused (its body
        would go unread, and answered as if it were empty)."""
        self.switched = True
        if not self.messages:
            return
        self.messages[-1].switches = True
        headers = Headers(self.messages[-1].headers)
        if "transfer-encoding" in headers or headers.get("content-length", "0").strip() != "0":
            self.messages.pop()
            self.error = HttpError(400, "invalid_argument", "a request that asks to switch "
                                   "protocols (Upgrade or CONNECT) must not have a body; send "
                                   "it without the Upgrade header")

    def _bound_partial_head(self, data: bytes, began: bool) -> None:
        """431 for a head that is not whole yet but already over the limit
        (the parser keeps a partial header line in memory; the callbacks count
        the whole lines exactly): counted by the reads that held nothing but
        that head."""
        if not self.messages:
            return
        message = self.messages[-1]
        if message.head_done or not began or self._completed_in_feed:
            return
        message.partial_bytes += len(data)
        if message.partial_bytes > HEAD_LIMIT_BYTES and self.error is None:
            self.messages.pop()
            self.error = _head_too_large()

    async def _read_head(self, first: bool) -> tuple[_Message | None, float]:
        """The next request with its head whole, and the time by which its body
        must be in; None when the client is done (or idle too long)."""
        timeout = self.limits.request_timeout if first else self.limits.keepalive_timeout
        deadline = self.waiting_since + timeout
        while True:
            if self.messages and self.messages[0].head_done:
                message = self.messages[0]
                if message.version not in VERSIONS:
                    raise HttpError(505, "version_not_supported", f"HTTP/{message.version} "
                                    "is not supported; speak HTTP/1.1")
                return message, deadline
            if self.error is not None:
                raise self.error
            begun = bool(self.messages)  # the first bytes of a request are in
            if self.ended:
                if begun:
                    raise HttpError(400, "invalid_argument", "malformed request: the "
                                    "connection ended inside the request's head")
                return None, deadline
            data = await self._receive(deadline)
            if data is None:
                if begun:
                    raise HttpError(408, "timeout", f"the request's head was not complete "
                                    f"{self.limits.request_timeout:g}s after it began")
                return None, deadline  # an idle connection: close it without a word
            if not begun and not first and data.strip():  # the next request's first byte
                deadline = self.loop.time() + self.limits.request_timeout
            self._feed(data)

    async def _read_body(self, message: _Message, deadline: float) -> bytes:
        while not message.complete:
            if len(message.body) > self.limits.max_body:  # admit() checked Content-Length
                raise HttpError(413, "payload_too_large", f"the body is over the limit "
                                f"of {self.limits.max_body} bytes")
            if self.error is not None:
                raise self.error
            if self.ended:
                raise HttpError(400, "invalid_argument", f"malformed request: the connection "
                                f"ended inside the body (after {len(message.body)} bytes)")
            data = await self._receive(deadline)
            if data is None:
                raise HttpError(408, "timeout", f"the request was not complete "
                                f"{self.limits.request_timeout:g}s after it began (got "
                                f"{len(message.body)} bytes of its body)")
            self._feed(data)
        return bytes(message.body)

    async def _receive(self, deadline: float) -> bytes | None:
        """What the client sent next (b"" at its end), or None past the deadline."""
        try:
            async with asyncio.timeout_at(deadline):
                return await self.reader.read(READ_CHUNK)
        except TimeoutError:
            return None
        except OSError:  # reset, or aborted to make room: the client is gone
            return b""

    def _continue_if_asked(self, message: _Message) -> None:
        """Expect: 100-continue: admitted, so ask for the body now."""
        if message.expects_continue() and not self.writer.transport.is_closing():
            self.writer.write(b"HTTP/1.1 100 Continue\r\nServer: " + SERVER_HEADER
                              + b"\r\n\r\n")

    # -- writing ----------------------------------------------------------------------

    async def _write(self, response: Response, close: bool, *, with_body: bool) -> None:
        data = raw_response(response, close=close, with_body=with_body)
        if self.writer.transport.is_closing():
            return  # reset by the client, or aborted to make room: nobody to answer
        try:
            self.writer.write(data)  # one write: the head and the body in one segment
            if not self.writer.transport.get_write_buffer_size() \
                    and not self.writer.transport.is_closing():
                return  # the kernel took it all: nothing to wait for (nor a timer to set)
            async with asyncio.timeout(self.limits.write_timeout):
                await self.writer.drain()
        except (ConnectionError, TimeoutError, _CLOSED_TRANSPORT):
            self.abort()

    async def _linger(self) -> None:
        """Stop writing, then read and drop what the client still sends (for a
        while), so closing does not reset the connection before the client
        reads the response; then close."""
        deadline, dropped = self.loop.time() + self.limits.linger, 0
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
            while dropped < self.limits.linger_bytes and not self.ended:
                data = await self._receive(deadline)
                if not data:
                    break
                dropped += len(data)
        except (OSError, _CLOSED_TRANSPORT):
            pass


@functools.lru_cache(maxsize=4)
def _http_date(second: int) -> bytes:
    """The Date header's value, formatted once a second (not once a response)."""
    return email.utils.formatdate(second, usegmt=True).encode()


@functools.cache
def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _response_headers(response: Response, close: bool) -> list[tuple[bytes, bytes]]:
    headers = [(b"Server", SERVER_HEADER),
               (b"Date", _http_date(int(time.time()))),
               (b"Content-Type", response.content_type.encode()),
               (b"Content-Length", str(len(response.body)).encode()),
               (b"Cache-Control", b"no-store"), (b"X-Content-Type-Options", b"nosniff")]
    headers += [(name.encode(), value.encode()) for name, value in response.headers.items()]
    if response.status == 401:
        headers.append((b"WWW-Authenticate", b'Bearer realm="pulse"'))
    if close:
        headers.append((b"Connection", b"close"))
    return headers


def raw_response(response: Response, *, close: bool, with_body: bool = True) -> bytes:
    """A whole response, head and body, as one piece of bytes (a HEAD's
    without the body, its Content-Length still the body's)."""
    lines = [b"HTTP/1.1 %d %s" % (response.status, _reason(response.status))]
    lines += [name + b": " + value for name, value in _response_headers(response, close)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + (response.body if with_body else b"")
