"""The HTTP API under hostile clients (issue 23, items 9-11): browsers on
other origins, DNS rebinding, slow clients, and requests a strict HTTP/1.1
parser must refuse. Each case ends with the server still serving."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from pulsed.config import ApiConfig, Config
from pulsed.http import ApiServer
from pulsed.http import server as api_http
from pulsed.http import wire
from tests.chaos.harness import record_result
from tests.pg import wait_until

CURL_HEADERS = {"User-Agent": "curl/8.5.0", "Accept": "*/*",
                "Content-Type": "application/x-www-form-urlencoded"}  # what curl -d sends
CURL_BODY = b'{"type":"email","priority":1}'
SLOW_CLIENTS = 70  # the attack
TRICKLE_S = 0.5  # a slow client sends one header line this often
NORMAL_DEADLINE_S = 2.0  # a normal request under attack is answered within this
SHORT_TIMEOUT_S = 1.0  # request_timeout for the tests that wait it out


def make_server(dsn: str, **options: Any) -> ApiServer:
    api = ApiConfig(enabled=True, listen="127.0.0.1:0",
                    **{k: options.pop(k) for k in ("token", "allowed_hosts") if k in options})
    return ApiServer(Config(api=api), dsn, **options)


@pytest.fixture
def server(dsn: str) -> Iterator[ApiServer]:
    with make_server(dsn) as running:
        yield running


def address(server: ApiServer) -> tuple[str, int]:
    parts = urlsplit(server.url)
    return parts.hostname, parts.port


def call(server: ApiServer, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, Any]:
    """One request as http.client sends it (Host: 127.0.0.1:<port> unless given)."""
    conn = http.client.HTTPConnection(*address(server), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        data = reply.read()
        return reply.status, json.loads(data) if data.startswith(b"{") else data
    finally:
        conn.close()


def exchange(server: ApiServer, raw: bytes, *, half_close: bool = False,
             timeout: float = 10) -> tuple[bytes, bool]:
    """Send raw bytes; the whole reply, and whether the server then closed."""
    with socket.create_connection(address(server), timeout=timeout) as sock:
        sock.sendall(raw)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return reply, True
            except TimeoutError:
                return reply, False
            if not chunk:
                return reply, True
            reply += chunk


def status_of(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:200]
    return int(reply.split(b" ", 2)[1])


def error_of(reply: bytes) -> dict[str, Any]:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]


def count_jobs(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM pulse_jobs").fetchone()[0]


def assert_still_serving(server: ApiServer) -> None:
    assert call(server, "GET", "/openapi.json")[0] == 200


# -- item 9: cross-origin writes, DNS rebinding, JSON only ------------------------------


def test_the_curl_example_is_created(server, dsn):
    status, job = call(server, "POST", "/jobs", CURL_BODY, CURL_HEADERS)
    assert status == 201, job
    assert (job["type"], job["priority"]) == ("email", 1)


def test_a_web_page_on_another_origin_cannot_create_jobs(server, dsn):
    """The issue's attack: a page's fetch() or form with text/plain got 201."""
    before = count_jobs(dsn)
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "application/json"):
        status, reply = call(server, "POST", "/jobs", CURL_BODY, {
            "Origin": "http://evil.example", "Content-Type": content_type,
            "Sec-Fetch-Site": "cross-site"})
        assert (status, reply["error"]["field"]) == (403, "Origin"), reply
    status, reply = call(server, "POST", "/jobs/1/cancel", None,
                         {"Origin": "http://evil.example"})
    assert status == 403
    forged = count_jobs(dsn) - before
    assert forged == 0
    curl, _ = call(server, "POST", "/jobs", CURL_BODY, CURL_HEADERS)
    assert curl == 201
    record_result(fault="cross-origin writes: POST /jobs from a page on evil.example "
                  "(text/plain, form, JSON) and a cancel", load="the curl example alongside",
                  lost=0, stuck=0, duplicates=0, recovery_s=None,
                  note=f"4 of 4 forged writes refused with 403 naming Origin, {forged} jobs "
                       f"created by them; the curl example (form type, no Origin) got {curl}")


def test_a_browser_without_origin_cannot_send_a_plain_text_body(server, dsn):
    status, reply = call(server, "POST", "/jobs", CURL_BODY, {"Content-Type": "text/plain"})
    assert (status, reply["error"]["field"]) == (415, "Content-Type")
    status, reply = call(server, "POST", "/jobs", CURL_BODY, {"Sec-Fetch-Site": "cross-site"})
    assert (status, reply["error"]["field"]) == (403, "Sec-Fetch-Site")


def test_the_status_page_origin_may_write_json(server):
    host, port = address(server)
    status, _ = call(server, "POST", "/jobs", CURL_BODY, {
        "Origin": f"http://{host}:{port}", "Content-Type": "application/json",
        "Sec-Fetch-Site": "same-origin"})
    assert status == 201


def test_dns_rebinding_cannot_read_jobs(server):
    """The issue's attack: Host: attacker.example read job payloads (200)."""
    paths = ("/jobs", "/jobs/1", "/status.json", "/metrics", "/")
    for path in paths:
        status, reply = call(server, "GET", path, headers={"Host": "attacker.example:8080"})
        assert status == 421, (path, reply)
        assert reply["error"]["field"] == "Host" and "attacker.example" in reply["error"]["message"]
    for host in ("localhost", f"localhost:{address(server)[1]}", "[::1]:8080"):
        assert call(server, "GET", "/jobs", headers={"Host": host})[0] == 200, host
    record_result(fault="DNS rebinding: GET with Host: attacker.example:8080",
                  load="reads of /jobs, /jobs/1, /status.json, /metrics, /", lost=0, stuck=0,
                  duplicates=0, recovery_s=None,
                  note=f"{len(paths)} of {len(paths)} refused with 421 naming Host; "
                       "localhost, localhost:PORT and [::1] still served")


def test_allowed_hosts_are_served(dsn):
    with make_server(dsn, allowed_hosts=("pulse.internal",)) as server:
        assert call(server, "GET", "/jobs", headers={"Host": "pulse.internal:8080"})[0] == 200
        assert call(server, "GET", "/jobs", headers={"Host": "other.internal"})[0] == 421


def test_a_request_without_host_is_400(server):
    reply, closed = exchange(server, b"GET /jobs HTTP/1.0\r\n\r\n")
    assert status_of(reply) == 400 and error_of(reply)["field"] == "Host"


@pytest.mark.parametrize("target", ["//healthz/jobs", "//x/metrics", "//jobs", "//metrics"])
def test_a_target_starting_with_two_slashes_is_a_path_not_a_host(server, dsn, target):
    # urlsplit() read "//healthz/jobs" as host healthz and path /jobs: a job
    # was created past a proxy that let only /healthz* through
    status, _ = call(server, "POST" if target.endswith("/jobs") else "GET", target,
                     body=b'{"type": "t"}' if target.endswith("/jobs") else None,
                     headers={"Content-Type": "application/json"})
    assert status == 404
    assert count_jobs(dsn) == 0


# -- item 10: slow clients --------------------------------------------------------------


class Tricklers:
    """Many connections, each sending one header line every TRICKLE_S, never
    finishing its request (the issue's slow-header attack), on one selector."""

    def __init__(self, server: ApiServer, count: int) -> None:
        self.socks = [socket.create_connection(address(server), timeout=5) for _ in range(count)]
        for sock in self.socks:
            sock.setblocking(False)
            self._send(sock, b"GET /jobs HTTP/1.1\r\nHost: localhost\r\n")
        self.sent_at = time.monotonic()
        self.lines = 0

    def _send(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.send(data)
        except OSError:
            pass  # closed by the server: that is allowed

    def trickle(self) -> None:
        if time.monotonic() - self.sent_at < TRICKLE_S:
            return
        self.lines += 1
        for sock in self.socks:
            self._send(sock, b"X-Slow-%d: %d\r\n" % (self.lines, self.lines))
        self.sent_at = time.monotonic()

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


@pytest.mark.parametrize("limit", [None, 32], ids=["default-limit", "limit-below-the-attack"])
def test_slow_header_clients_do_not_lock_normal_ones_out(dsn, monkeypatch, limit):
    """The issue's attack: 70 connections each sending a header line every 5 s
    made every normal request get 503 for a minute. Whether the attackers fit
    under the connection limit or not, a normal request is answered in time."""
    if limit is not None:
        monkeypatch.setattr(api_http, "MAX_CONNECTIONS", limit)
    with make_server(dsn) as server:
        attack = Tricklers(server, SLOW_CLIENTS)
        before, answers = count_jobs(dsn), []
        try:
            for _ in range(4):  # ~2 s of attack, a normal request in each half second
                attack.trickle()
                started = time.monotonic()
                status, _ = call(server, "POST", "/jobs", CURL_BODY, CURL_HEADERS,
                                 timeout=NORMAL_DEADLINE_S)
                answers.append(time.monotonic() - started)
                assert status == 201
                assert answers[-1] < NORMAL_DEADLINE_S
                wait_until(lambda: time.monotonic() - attack.sent_at >= TRICKLE_S,
                           timeout=5, interval=0.05, message="the next trickle")
        finally:
            attack.close()
    lost = len(answers) - (count_jobs(dsn) - before)
    assert lost == 0
    limit_text = f"connection limit {limit or api_http.MAX_CONNECTIONS}"
    record_result(fault=f"slow-header attack: {SLOW_CLIENTS} connections, one header line "
                  f"every {TRICKLE_S:g} s, {limit_text}",
                  load=f"{len(answers)} POST /jobs from a normal client, one every "
                       f"{TRICKLE_S:g} s", lost=lost, stuck=0, duplicates=0, recovery_s=None,
                  note=f"{len(answers)} of {len(answers)} answered 201, slowest in "
                       f"{max(answers):.3f} s (was: every one 503 for the whole minute)")


def test_a_request_trickled_past_its_deadline_gets_408(dsn, caplog):
    """Each recv succeeds (a line every 0.2 s), but the whole request must be in
    within request_timeout: the old per-recv timeout never fired."""
    with make_server(dsn, request_timeout=SHORT_TIMEOUT_S) as server, \
            socket.create_connection(address(server), timeout=5) as sock:
        sock.sendall(b"GET /jobs HTTP/1.1\r\nHost: localhost\r\n")
        started, reply = time.monotonic(), b""
        sock.settimeout(0.2)
        while not reply and time.monotonic() - started < 5:
            try:
                reply = sock.recv(65536)
            except TimeoutError:
                sock.sendall(b"X-Slow: 1\r\n")
        assert status_of(reply) == 408, reply
        assert time.monotonic() - started < SHORT_TIMEOUT_S + 1.5
        assert_still_serving(server)


def test_the_token_is_checked_before_the_body_is_read(dsn):
    with make_server(dsn, token="s3cret") as server:
        started = time.monotonic()
        reply, closed = exchange(server, b"POST /jobs HTTP/1.1\r\nHost: localhost\r\n"
                                 b"Content-Type: application/json\r\n"
                                 b"Content-Length: 100000\r\n\r\n{")
        assert status_of(reply) == 401 and closed
        assert time.monotonic() - started < 3  # not after waiting for 100000 bytes


# -- item 11: strict parsing ------------------------------------------------------------


MALFORMED = {
    "space before the colon": (b"POST /jobs HTTP/1.1\r\nHost: localhost\r\n"
                               b"Transfer-Encoding : chunked\r\nContent-Length: 2\r\n\r\n{}", 400),
    "obs-fold": (b"GET /jobs HTTP/1.1\r\nHost: localhost\r\nX-A: a\r\n b\r\n\r\n", 400),
    "obs-fold of the first header": (b"GET /jobs HTTP/1.1\r\n Host: localhost\r\n\r\n", 400),
    "Content-Length and chunked": (b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length:"
                                   b" 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    "two Content-Lengths": (b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n"
                            b"Content-Length: 3\r\n\r\n{}", 400),
    "bare CR in a value": (b"GET /jobs HTTP/1.1\r\nHost: localhost\r\nX-A: a\rb\r\n\r\n", 400),
    "a body shorter than its Content-Length": (b"POST /jobs HTTP/1.1\r\nHost: localhost\r\n"
                                               b"Content-Length: 10\r\n\r\n{}", 400),
    "a head over 16 KiB": (b"GET /jobs HTTP/1.1\r\nHost: localhost\r\nX-Big: "
                           + b"a" * 20000 + b"\r\n\r\n", 431),
    "HTTP/2.0 in the request line": (b"GET /jobs HTTP/2.0\r\nHost: localhost\r\n\r\n", 505),
    "garbage for a request line": (b"\x00\x01\x02 hello\r\n\r\n", 400),
    "a bare LF after the request line": (b"GET /jobs HTTP/1.1\nHost: localhost\r\n\r\n", 400),
}


@pytest.mark.parametrize("raw, expected", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_get_a_400_class_answer_and_a_closed_connection(
        server, caplog, raw, expected):
    caplog.set_level(logging.DEBUG, logger="pulsed")
    reply, closed = exchange(server, raw, half_close=True)
    assert status_of(reply) == expected, reply[:300]
    assert b"connection: close" in reply.lower() and closed
    assert error_of(reply)["message"]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert_still_serving(server)


def test_every_malformed_request_on_one_server(server, caplog, dsn):
    """The same cases one after the other on one server: the result row."""
    caplog.set_level(logging.DEBUG, logger="pulsed")
    before = count_jobs(dsn)
    answers = {name: status_of(exchange(server, raw, half_close=True)[0])
               for name, (raw, _) in MALFORMED.items()}
    assert answers == {name: expected for name, (_, expected) in MALFORMED.items()}
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks and count_jobs(dsn) == before
    assert_still_serving(server)
    record_result(fault=f"malformed requests: {', '.join(MALFORMED)}",
                  load="one connection each, then a normal request", lost=0, stuck=0,
                  duplicates=0, recovery_s=None,
                  note=f"answers {sorted(set(answers.values()))}, each connection closed, "
                       f"{len(tracebacks)} tracebacks or errors logged, 0 jobs created (was: "
                       "the header after 'Transfer-Encoding :' ignored, obs-fold accepted, a "
                       "short body 500 with a traceback)")


def test_a_body_that_stops_short_gets_408_when_the_client_holds_on(dsn, caplog):
    with make_server(dsn, request_timeout=SHORT_TIMEOUT_S) as server:
        reply, closed = exchange(server, b"POST /jobs HTTP/1.1\r\nHost: localhost\r\n"
                                 b"Content-Length: 10\r\n\r\n{}", timeout=5)
        assert status_of(reply) == 408 and closed
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_keep_alive_serves_many_requests_on_one_connection(server):
    conn = http.client.HTTPConnection(*address(server), timeout=5)
    try:
        for _ in range(3):
            conn.request("POST", "/jobs", body=CURL_BODY, headers=CURL_HEADERS)
            reply = conn.getresponse()
            assert reply.status == 201 and not reply.will_close
            reply.read()
        first = conn.sock
        conn.request("GET", "/nope")  # an error keeps the connection too
        reply = conn.getresponse()
        assert reply.status == 404 and not reply.will_close
        reply.read()
        conn.request("GET", "/openapi.json")
        assert conn.getresponse().status == 200 and conn.sock is first
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(server):
    one = b"GET /jobs/999999 HTTP/1.1\r\nHost: localhost\r\n\r\n"
    last = b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    reply, closed = exchange(server, one + one + last)
    assert reply.count(b"HTTP/1.1 404") == 2 and b"HTTP/1.1 200" in reply and closed
    assert reply.index(b"HTTP/1.1 200") > reply.rindex(b"HTTP/1.1 404")


def test_a_malformed_request_behind_a_good_one_is_refused_after_it(server):
    """Pipelined in one segment: the good request is answered, then the
    malformed one gets its 400 and the connection closes."""
    good = b"GET /jobs/999999 HTTP/1.1\r\nHost: localhost\r\n\r\n"
    bad = b"GET /jobs HTTP/1.1\r\nHost: localhost\r\nX-A : b\r\n\r\n"
    reply, closed = exchange(server, good + bad)
    assert reply.startswith(b"HTTP/1.1 404") and closed
    assert reply.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 400" in reply


def test_a_head_trickled_over_the_limit_gets_431_before_its_deadline(dsn):
    """One header line that never ends, sent 4 KiB at a time: refused once it
    passes the head limit, not held in memory until the request times out."""
    with make_server(dsn, request_timeout=30) as server, \
            socket.create_connection(address(server), timeout=5) as sock:
        sock.sendall(b"GET /jobs HTTP/1.1\r\nHost: localhost\r\nX-Long: ")
        started, sent, reply = time.monotonic(), 0, b""
        sock.settimeout(0.05)
        while not reply and time.monotonic() - started < 10:
            try:
                reply = sock.recv(65536)
            except TimeoutError:
                try:
                    sock.sendall(b"a" * 4096)
                except OSError:
                    break  # closed: its reply is in the socket's buffer
                sent += 4096
        sock.settimeout(5)
        reply += sock.recv(65536) if not reply else b""
        assert status_of(reply) == 431, reply[:300]
        assert sent <= wire.HEAD_LIMIT_BYTES + 3 * wire.READ_CHUNK
        assert time.monotonic() - started < 10
        assert_still_serving(server)


def send_in_pieces(server: ApiServer, pieces: list[bytes]) -> tuple[bytes, bool]:
    """Send each piece once the server has read the one before (nothing to
    wait on but time: a short pause), half-close; the reply and whether the
    server closed."""
    with socket.create_connection(address(server), timeout=10) as sock:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.02)  # separate reads on the server's side
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        return reply, True


def test_a_head_under_the_limit_is_served_whatever_pieces_it_comes_in(server):
    """~11 KB of headers (big cookies, a JWT) in network-sized pieces: each
    byte counts once against the 16 KiB limit (counted twice, such a head
    got 431)."""
    headers = b"".join(b"X-H%d: %s\r\n" % (n, b"v" * 100) for n in range(100))
    raw = b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\n" + headers + b"\r\n"
    reply, _ = send_in_pieces(server, [raw[n:n + 1460] for n in range(0, len(raw), 1460)])
    assert status_of(reply) == 200, reply[:300]
    reply, _ = send_in_pieces(server, [raw[:7000], raw[7000:]])
    assert status_of(reply) == 200, reply[:300]


def test_a_head_over_the_limit_is_431_with_a_request_pipelined_behind_it(server):
    big = (b"GET /nope HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 60000
           + b"\r\n\r\n")
    reply, closed = exchange(server, big + b"GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n",
                             half_close=True)
    assert status_of(reply) == 431 and reply.count(b"HTTP/1.1 ") == 1 and closed


def test_pipelined_requests_past_the_limit_are_refused_after_those_within(server):
    """A 64 KiB read of tiny requests made ~1,800 of them at once, kept as
    objects until each was answered: past MAX_PIPELINED the rest is refused."""
    one = b"GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n"
    reply, closed = exchange(server, one * 1000, half_close=True)
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)]
    assert statuses == [404] * wire.MAX_PIPELINED + [400] and closed
    assert b"pipelined requests at once" in reply


def test_an_upgrade_request_with_a_body_is_refused(server, dsn):
    """The parser stops at an Upgrade request's head: its body would go
    unread and the request be answered as if it had none."""
    before = count_jobs(dsn)
    raw = (b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\n"
           b"Upgrade: websocket\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(CURL_BODY), CURL_BODY))
    reply, closed = exchange(server, raw, half_close=True)
    assert status_of(reply) == 400 and closed and b"switch protocols" in reply
    assert count_jobs(dsn) == before


def test_a_client_gone_before_its_answer_logs_no_error(server, caplog):
    """uvloop raises RuntimeError writing to a connection the client reset;
    that is the client's leaving, not the server's error."""
    caplog.set_level(logging.DEBUG, logger="pulsed")
    for raw in (b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(CURL_BODY), CURL_BODY),
                b"GET /jobs/1?wait=1 HTTP/1.1\r\nHost: localhost\r\n\r\n"):
        sock = socket.create_connection(address(server), timeout=5)
        sock.sendall(raw)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset while the request is being answered
    wait_until(lambda: not server._listener.connections, timeout=10, interval=0.05,
               message="the server to drop both connections")
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert_still_serving(server)


def test_http_1_0_and_connection_close_are_answered_then_closed(server):
    for raw in (b"GET /openapi.json HTTP/1.0\r\nHost: localhost\r\n\r\n",
                b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"):
        reply, closed = exchange(server, raw)
        assert status_of(reply) == 200 and closed
        assert b"connection: close" in reply.split(b"\r\n\r\n", 1)[0].lower()


def test_a_request_to_switch_protocols_is_answered_and_the_rest_not_read(server, dsn):
    """Upgrade (or CONNECT) is not spoken: the request is answered as any
    other, and what follows it is not parsed as more requests."""
    before = count_jobs(dsn)
    upgrade = (b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
               b"Upgrade: websocket\r\n\r\n")
    smuggled = (b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(CURL_BODY), CURL_BODY))
    reply, closed = exchange(server, upgrade + smuggled)
    assert status_of(reply) == 200 and closed and reply.count(b"HTTP/1.1 ") == 1
    good = b"GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n"
    reply, closed = exchange(server, good + upgrade + smuggled)  # the switch is the second's
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", reply) == [b"404", b"200"] and closed
    reply, closed = exchange(server, b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost\r\n\r\n"
                             + smuggled)
    assert status_of(reply) in (400, 501) and closed and reply.count(b"HTTP/1.1 ") == 1
    assert count_jobs(dsn) == before
    assert_still_serving(server)


def test_a_response_is_written_in_one_piece(server, monkeypatch):
    """Head and body in one write to the transport (a head and a body in
    two small writes stall on the client's delayed ACK: ~40 ms a request on
    keep-alive). The transport (uvloop's) sends one buffer with one send()."""
    writes: list[bytes] = []
    write = asyncio.StreamWriter.write

    def counting(self: asyncio.StreamWriter, data: Any) -> None:
        writes.append(bytes(data))
        write(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", counting)
    assert call(server, "GET", "/openapi.json")[0] == 200
    [response] = [w for w in writes if w.startswith(b"HTTP/1.1 200")]
    head, _, body = response.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    assert len(body) == length > 0, "the head went out without its body"
