"""One HTTP/1.1 connection of the API on asyncio, parsed by h11.

h11 (python-hyper) parses strictly per RFC 7230: whitespace before a
header's colon, bad or conflicting Content-Length, bare CR and the like are
errors, not guesses. Two things are added on top of it:

- An obs-folded header line (one starting with a space or a tab) is refused
  with 400. h11 unfolds it, as RFC 7230 §3.2.4 allows, but a proxy in front
  may read the same bytes differently.
- Time: a request's head and body must arrive within ``request_timeout`` of
  its first byte (of the connection, for its first request), however the
  client trickles them; waiting for the next request on a kept-alive
  connection is bounded by ``keepalive_timeout``. A late request gets 408.

What a request may do is the Application's business: ``admit`` looks at the
head (before a byte of the body is read: the token, the size, the origin),
``respond`` turns the admitted head and the body into a Response. A
response goes out in one write: head and body together, so no delayed-ACK
stall between two small segments. A connection whose body was left unread
(an early error) is closed after lingering, so the client reads the error
instead of a reset.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

import h11

import pulsed
from pulsed.http.messages import HttpError, Response, json_response

log = logging.getLogger("pulsed.http")

HEAD_LIMIT_BYTES = 16 * 1024  # request line and headers; more is 431
READ_CHUNK = 64 * 1024
SERVER_HEADER = f"pulsed/{pulsed.__version__}".encode()
STATUS_CODES = {400: "invalid_argument", 401: "unauthorized", 403: "forbidden",
                404: "not_found", 405: "method_not_allowed", 408: "timeout",
                411: "length_required", 413: "payload_too_large", 414: "uri_too_long",
                415: "unsupported_media_type", 421: "misdirected_request",
                431: "headers_too_large", 501: "not_implemented", 503: "unavailable",
                505: "version_not_supported"}
# Refusals after which the rest of the stream cannot be trusted to be framed as
# the client meant (a proxy in front may have read it differently: request
# smuggling), or that end a slow client: the connection closes.
CLOSING_STATUSES = frozenset({400, 408, 411, 413, 431})
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_FOLDED_LINE = re.compile(rb"\n[ \t]")


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
        for name, value in pairs:  # h11 has lowercased and checked the names
            joined.setdefault(name.decode("ascii"), []).append(value.decode("latin-1"))
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


def _malformed(exc: h11.RemoteProtocolError) -> HttpError:
    status = exc.error_status_hint
    if status == 501:  # a Transfer-Encoding h11 does not know; the API takes none at all
        return HttpError(411, "length_required", f"send the body with Content-Length "
                         f"(transfer encodings are not supported: {exc})")
    return HttpError(status, STATUS_CODES.get(status, "invalid_argument"),
                     f"malformed request: {exc}")


class HttpConnection:
    """Serves the requests of one client, one after the other (keep-alive)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 app: Application, limits: Limits) -> None:
        self.reader, self.writer, self.app, self.limits = reader, writer, app, limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT_BYTES)
        self.loop = asyncio.get_running_loop()
        self.waiting_since = self.loop.time()  # when it began waiting for its request
        self.busy = False  # a request is being answered: not to be closed for room

    def abort(self) -> None:
        """Close at once (to make room, or at shutdown)."""
        self.writer.transport.abort()

    async def serve(self) -> None:
        first = True
        while True:
            head = await self._exchange(first)
            if head is None or not self._next_cycle():
                return
            first = False
            self.waiting_since = self.loop.time()

    def _next_cycle(self) -> bool:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    async def _exchange(self, first: bool) -> Head | None:
        """Read one request and answer it; None when the connection is done."""
        head: Head | None = None
        try:
            request, deadline = await self._read_head(first)
            if request is None:
                return None
            head = Head(request.method.decode("ascii"), request.target.decode("latin-1"),
                        Headers(request.headers))
            admitted = self.app.admit(head)
            self._continue_if_asked()
            body = await self._read_body(deadline)
            self.busy = True
            response = await self.app.respond(admitted, body)
        except HttpError as exc:
            response = error_response(exc)
            if head is not None:
                self._drop_buffered_body()
        try:
            await self._write(response, head)
        finally:
            self.busy = False
        if self.h11.their_state is not h11.DONE:  # the body (or garbage) left unread
            await self._linger()
            return None
        return head if self.h11.our_state is h11.DONE else None

    # -- reading ----------------------------------------------------------------------

    async def _read_head(self, first: bool) -> tuple[h11.Request | None, float]:
        """The next request's head, and the time by which its body must be in."""
        raw = bytearray(self.h11.trailing_data[0])  # pipelined behind the last request
        timeout = self.limits.request_timeout if first else self.limits.keepalive_timeout
        deadline = self.waiting_since + timeout
        while True:
            event = self._next_event()
            if isinstance(event, h11.Request):
                _check_head(bytes(raw))
                return event, deadline
            if event is not h11.NEED_DATA:
                return None, deadline  # ConnectionClosed: the client is done
            data = await self._receive(deadline)
            if data is None:
                if raw.strip():
                    raise HttpError(408, "timeout", f"the request's head was not complete "
                                    f"{self.limits.request_timeout:g}s after it began")
                return None, deadline  # an idle connection: close it without a word
            if not raw.strip() and not first:  # the next request's first byte
                deadline = self.loop.time() + self.limits.request_timeout
            raw += data
            self.h11.receive_data(data)

    async def _read_body(self, deadline: float) -> bytes:
        body = bytearray()
        while True:
            event = self._next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.limits.max_body:  # admit() checked Content-Length
                    raise HttpError(413, "payload_too_large", f"the body is over the limit "
                                    f"of {self.limits.max_body} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                data = await self._receive(deadline)
                if data is None:
                    raise HttpError(408, "timeout", f"the request was not complete "
                                    f"{self.limits.request_timeout:g}s after it began (got "
                                    f"{len(body)} bytes of its body)")
                self.h11.receive_data(data)

    def _drop_buffered_body(self) -> None:
        """After refusing a request: drop its body if it is all here already (a
        GET's empty one always is), so the connection can serve the next one."""
        try:
            event = self.h11.next_event()
            while isinstance(event, h11.Data):  # until EndOfMessage, or NEED_DATA: the
                event = self.h11.next_event()  # rest is on its way, the connection closes
        except h11.RemoteProtocolError:
            pass  # h11 is in its error state: the connection closes

    def _next_event(self) -> Any:
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise _malformed(exc) from None

    async def _receive(self, deadline: float) -> bytes | None:
        """What the client sent next (b"" at its end), or None past the deadline."""
        try:
            async with asyncio.timeout_at(deadline):
                return await self.reader.read(READ_CHUNK)
        except TimeoutError:
            return None
        except OSError:  # reset, or aborted to make room: the client is gone
            return b""

    def _continue_if_asked(self) -> None:
        """Expect: 100-continue: admitted, so ask for the body now."""
        if self.h11.they_are_waiting_for_100_continue:
            self.writer.write(self.h11.send(h11.InformationalResponse(
                status_code=100, headers=[(b"Server", SERVER_HEADER)])))

    # -- writing ----------------------------------------------------------------------

    async def _write(self, response: Response, head: Head | None) -> None:
        close = self.h11.their_state is not h11.DONE or response.status in CLOSING_STATUSES \
            or response.status >= 500
        data = self._encode(response, head, close)
        try:
            self.writer.write(data)  # one write: the head and the body in one segment
            if not self.writer.transport.get_write_buffer_size() \
                    and not self.writer.transport.is_closing():
                return  # the kernel took it all: nothing to wait for (nor a timer to set)
            async with asyncio.timeout(self.limits.write_timeout):
                await self.writer.drain()
        except (ConnectionError, TimeoutError):
            self.abort()

    def _encode(self, response: Response, head: Head | None, close: bool) -> bytes:
        headers = _response_headers(response, close)
        try:
            data = self.h11.send(h11.Response(status_code=response.status, headers=headers,
                                              reason=_reason(response.status)))
            if head is None or head.method != "HEAD":
                data += self.h11.send(h11.Data(data=response.body))
            return data + self.h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:  # h11 cannot frame a reply in its state: say it raw
            self.h11 = h11.Connection(h11.SERVER)  # and never reuse the connection
            return raw_response(response, close=True)

    async def _linger(self) -> None:
        """Stop writing, then read and drop what the client still sends (for a
        while), so closing does not reset the connection before the client
        reads the response; then close."""
        deadline, dropped = self.loop.time() + self.limits.linger, 0
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
            while dropped < self.limits.linger_bytes:
                data = await self._receive(deadline)
                if not data:
                    break
                dropped += len(data)
        except OSError:
            pass


def _check_head(raw: bytes) -> None:
    """What h11 lets through in the head at the start of ``raw``: a folded
    header line (obs-fold), and a head over the limit that arrived whole (h11
    limits only the part it waits for)."""
    raw = raw.lstrip(b"\r\n")  # blank lines before a request are allowed
    blank = _BLANK_LINE.search(raw)
    end = blank.start() if blank else len(raw)
    if end > HEAD_LIMIT_BYTES:
        raise HttpError(431, "headers_too_large", f"the request line and headers are over "
                        f"the limit of {HEAD_LIMIT_BYTES} bytes")
    if _FOLDED_LINE.search(raw, 0, end) is not None:
        raise HttpError(400, "invalid_argument", "malformed request: a header line is folded "
                        "(obs-fold); send each header on one line")


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


def raw_response(response: Response, *, close: bool) -> bytes:
    """A whole response without h11 (before a connection is served, or when
    h11's state cannot frame one)."""
    lines = [b"HTTP/1.1 %d %s" % (response.status, _reason(response.status))]
    lines += [name + b": " + value for name, value in _response_headers(response, close)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + response.body
