"""The HTTP API in-process against a real PostgreSQL: every endpoint and its
error paths (SPEC §7, §9)."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pulsed
from pulsed.http import server as api_http
from pulsed.api import HandlerRegistry
from pulsed.config import ApiConfig, Config, TypeConfig
from pulsed.control.client import DaemonUnreachable
from pulsed.db import store_operator
from pulsed.db.store import Store
from pulsed.errors import ConfigError
from pulsed.http import ROUTES, ApiServer
from tests.promtool import promtool_check

HEALTHY_STATUS = {
    "master": {"pid": 1, "state": "running", "uptime_s": 5.0, "node_id": "node-a",
               "version": pulsed.__version__, "workers_desired": 2},
    "leader": {"node_id": "node-a", "term": 3, "is_me": True},
    "children": [{"role": "scheduler", "index": 0, "pid": 10, "state": "busy", "job": None,
                  "jobs_done": 0, "restarts": 0, "rss_bytes": 1},
                 {"role": "worker", "index": 1, "pid": 11, "state": "idle", "job": None,
                  "jobs_done": 4, "restarts": 0, "rss_bytes": 1},
                 {"role": "worker", "index": 2, "pid": 12, "state": "backoff", "job": None,
                  "jobs_done": 0, "restarts": 3, "rss_bytes": 0}],
    "queues": [{"type": "email", "state": "available", "count": 2}],
    "oldest_available_age_s": 1.5,
}


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    closed: bool = False

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        return self.json["error"]


@dataclass
class Client:
    url: str
    token: str | None = None
    default_headers: dict[str, str] = field(default_factory=dict)

    def call(self, method: str, path: str, body: bytes | str | dict | None = None,
             headers: dict[str, str] | None = None) -> Reply:
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        try:
            if isinstance(body, dict):
                body = json.dumps(body)
            all_headers = {**self.default_headers, **(headers or {})}
            if self.token:
                all_headers.setdefault("Authorization", f"Bearer {self.token}")
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            data = response.read()
            return Reply(response.status, response.headers, data, response.will_close)
        finally:
            conn.close()

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.call("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Reply:
        return self.call("POST", path, body, **kwargs)


def make_config(*, token: str = "", types: dict[str, TypeConfig] | None = None,
                listen: str = "127.0.0.1:0") -> Config:
    return Config(api=ApiConfig(enabled=True, listen=listen, token=token), types=types or {})


@pytest.fixture
def server(dsn: str) -> Iterator[ApiServer]:
    with ApiServer(make_config(types={"report": TypeConfig(priority=7, max_attempts=3)}),
                   dsn) as running:
        yield running


@pytest.fixture
def client(server: ApiServer) -> Client:
    # curl -d sends this content type; the API reads JSON whatever it says.
    return Client(server.url, default_headers={"Content-Type": "application/x-www-form-urlencoded"})


def enqueue(conn: psycopg.Connection, job_type: str = "email", **kwargs: Any) -> int:
    return pulsed.enqueue(conn, job_type, kwargs.pop("payload", {}), **kwargs)


# -- POST /jobs ------------------------------------------------------------------------


def test_the_curl_example_gives_201_and_a_job(client, conn):
    reply = client.post("/jobs", '{"type":"email","priority":1}')
    assert reply.status == 201, reply.body
    job = reply.json
    assert {k: job[k] for k in ("type", "priority", "state", "queue", "attempt", "payload")} == \
        {"type": "email", "priority": 1, "state": "available", "queue": "default",
         "attempt": 0, "payload": {}}
    assert reply.headers["Location"] == f"/jobs/{job['id']}"
    assert set(job) >= {"id", "type", "queue", "state", "priority", "attempt", "max_attempts",
                        "payload", "run_at", "created_at", "finished_at", "idempotency_key",
                        "last_error"}
    assert Store(conn).get_job(job["id"]).type == "email"


def test_an_idempotent_repeat_gives_200_and_the_same_job(client):
    body = {"type": "email", "priority": 1, "idempotency_key": "welcome-42"}
    first = client.post("/jobs", body)
    second = client.post("/jobs", body)
    assert (first.status, second.status) == (201, 200)
    assert second.json["id"] == first.json["id"]
    assert second.json["idempotency_key"] == "welcome-42"


def test_unique_while_frees_the_key_once_the_job_is_cancelled(client):
    body = {"type": "sync", "idempotency_key": "k", "unique_while": "unfinished"}
    first = client.post("/jobs", body)
    assert client.post("/jobs", body).json["id"] == first.json["id"]
    assert client.post(f"/jobs/{first.json['id']}/cancel", {}).status == 200
    again = client.post("/jobs", body)
    assert again.status == 201 and again.json["id"] != first.json["id"]
    held = client.post("/jobs", {"type": "sync", "idempotency_key": "h", "unique_for": 3600})
    assert client.post("/jobs", {"type": "sync", "idempotency_key": "h"}).json["id"] == \
        held.json["id"]


def test_every_field_is_taken(client):
    run_at = (datetime.now(timezone.utc) + timedelta(hours=1)).replace(microsecond=0)
    reply = client.post("/jobs", {
        "type": "sync", "payload": {"user": 7, "tags": ["a"]}, "priority": -3, "queue": "slow",
        "run_at": run_at.isoformat().replace("+00:00", "Z"), "max_attempts": 4,
        "idempotency_key": "sync-7", "timeout": 30})
    assert reply.status == 201, reply.body
    job = reply.json
    assert (job["payload"], job["priority"], job["queue"], job["max_attempts"], job["state"]) == \
        ({"user": 7, "tags": ["a"]}, -3, "slow", 4, "scheduled")
    assert datetime.fromisoformat(job["run_at"]) == run_at
    delayed = client.post("/jobs", {"type": "sync", "delay": 3600}).json
    assert delayed["state"] == "scheduled"


def test_type_defaults_come_from_the_config(client):
    job = client.post("/jobs", {"type": "report"}).json
    assert (job["priority"], job["max_attempts"]) == (7, 3)
    assert client.post("/jobs", {"type": "report", "priority": 1}).json["priority"] == 1


@pytest.mark.parametrize("body, field, words", [
    ('{"type": "email", ', "body", "not valid JSON"),
    ("", "body", "empty"),
    ("[1, 2]", "jobs[0]", "jobs[0] must be a JSON object, got an integer"),  # an array of jobs
    ("\"email\"", "body", "must be a JSON object or an array of them, got a string"),
    ('{"priority": 1}', "type", "type is required"),
    ('{"type": null}', "type", "type is required"),
    ('{"type": 5}', "type", "must be a string"),
    ('{"type": ""}', "type", "must not be empty"),
    ('{"type": "email", "priority": "x"}', "priority", "priority must be an integer"),
    ('{"type": "email", "priority": 1.5}', "priority", "must be an integer"),
    ('{"type": "email", "priority": true}', "priority", "must be an integer"),
    ('{"type": "email", "priority": 99999}', "priority", "between -32768 and 32767"),
    ('{"type": "email", "priorty": 1}', "priorty", "unknown field"),
    ('{"type": "email", "payload": [1]}', "payload", "must be a JSON object"),
    ('{"type": "email", "payload": {"a": "\\u0000"}}', "payload", "NUL"),
    ('{"type": "email", "delay": -1}', "delay", ">= 0"),
    ('{"type": "email", "delay": "soon"}', "delay", "number of seconds"),
    ('{"type": "email", "run_at": "2030-01-01T00:00:00"}', "run_at", "timezone"),
    ('{"type": "email", "run_at": "tomorrow"}', "run_at", "ISO 8601"),
    ('{"type": "email", "run_at": 1700000000}', "run_at", "ISO 8601 string"),
    ('{"type": "email", "run_at": "2030-01-01T00:00:00Z", "delay": 5}', "run_at", "not both"),
    ('{"type": "email", "max_attempts": 0}', "max_attempts", "between 1"),
    ('{"type": "email", "idempotency_key": 7}', "idempotency_key", "must be a string"),
    ('{"type": "email", "queue": "x\\u0000"}', "queue", "NUL"),
    ('{"type": "email\\nERROR forged"}', "type", "control characters"),
    ('{"type": "email", "run_at": "0001-01-01T00:00:00+14:00"}', "run_at", "1970-01-01"),
    ('{"type": "email", "run_at": "9999-12-31T23:00:00-14:00"}', "run_at", "9999-12-30"),
    ('{"type": "email", "timeout": 1e-300}', "timeout", "between 0.001"),
    ('{"type": "email", "unique_while": "unfinished"}', "unique_while", "idempotency_key"),
    ('{"type": "email", "idempotency_key": "k", "unique_while": "x"}', "unique_while",
     "'unfinished'"),
    ('{"type": "email", "idempotency_key": "k", "unique_for": -1}', "unique_for", "> 0"),
    ('{"type": "email", "idempotency_key": "k", "unique_for": 5, "unique_while": '
     '"unfinished"}', "unique_for", "not both"),
    ('{"type": "\\ud800"}', "body", "surrogate"),
    ('{"type": "email", "payload": {"n": 1e999}}', "payload", "JSON"),
])
def test_bad_input_gives_400_naming_the_field(client, body, field, words):
    reply = client.post("/jobs", body)
    assert reply.status == 400, reply.body
    error = reply.error
    assert (error["code"], error["field"]) == ("invalid_argument", field), error
    assert words in error["message"], error


# -- GET /jobs/{id}, GET /jobs -------------------------------------------------------------


def test_get_job_shows_every_attempt_with_its_error(client, conn, dsn):
    job_id = enqueue(conn, "flaky", max_attempts=2)
    registry = HandlerRegistry()

    def flaky(job: pulsed.Job) -> None:
        raise ValueError(f"attempt {job.attempt} broke")

    registry.register("flaky", flaky)
    pulsed.run_worker(dsn, registry=registry, max_jobs=1, backoff=lambda attempt: 0.0)
    Store(conn).promote_due()
    pulsed.run_worker(dsn, registry=registry, max_jobs=1, backoff=lambda attempt: 0.0)
    job = client.get(f"/jobs/{job_id}").json
    assert job["state"] == "failed"
    assert [(a["attempt"], a["outcome"]) for a in job["attempts"]] == [(1, "error"), (2, "error")]
    first = job["attempts"][0]
    assert "attempt 1 broke" in first["error"]
    assert first["error_class"] == "ValueError"
    assert "Traceback" in first["traceback"] and first["worker"] and first["started_at"]


@pytest.mark.parametrize("path, status, code", [
    ("/jobs/999999", 404, "not_found"),
    ("/jobs/abc", 400, "invalid_argument"),
    ("/jobs/0", 400, "invalid_argument"),
    ("/jobs/-1", 400, "invalid_argument"),
    ("/jobs/99999999999999999999", 400, "invalid_argument"),
    ("/jobs/%39%39%39%39%39%39", 404, "not_found"),  # percent-decoded: /jobs/999999
    ("/jobs/%2D1", 400, "invalid_argument"),  # -1
    ("/jobs/%FF", 400, "invalid_argument"),  # not UTF-8
])
def test_get_job_errors(client, path, status, code):
    reply = client.get(path)
    assert (reply.status, reply.error["code"]) == (status, code)


def test_list_pages_through_every_job_newest_first(client, conn):
    ids = [enqueue(conn, "email" if i % 2 else "sms") for i in range(7)]
    seen, after, pages = [], None, 0
    while True:
        query = "/jobs?limit=3" + (f"&after={after}" if after else "")
        page = client.get(query).json
        seen += [job["id"] for job in page["jobs"]]
        pages += 1
        after = page["next_after"]
        if after is None:
            break
    assert seen == sorted(ids, reverse=True) and pages == 3
    emails = client.get("/jobs?type=email&state=available&limit=50").json
    assert [j["id"] for j in emails["jobs"]] == sorted(ids[1::2], reverse=True)
    assert emails["next_after"] is None
    blank = client.get("/jobs?state=&type=").json  # blank filters are no filters
    assert len(blank["jobs"]) == 7 and "attempts" not in blank["jobs"][0]


def test_a_page_of_large_payloads_ends_early_and_the_next_page_goes_on(client, conn,
                                                                       monkeypatch):
    # 1,000 jobs of 1 MiB payloads were one answer of a gigabyte, held in
    # the API child's memory; a page now stops at MAX_LIST_BYTES of them
    monkeypatch.setattr(store_operator, "MAX_LIST_BYTES", 3000)
    ids = [enqueue(conn, payload={"blob": "x" * 1000}) for _ in range(7)]
    pages = []
    after = None
    while True:
        page = client.get("/jobs?limit=50" + (f"&after={after}" if after else "")).json
        pages.append([job["id"] for job in page["jobs"]])
        assert all(job["payload"] == {"blob": "x" * 1000} for job in page["jobs"])
        after = page["next_after"]
        if after is None:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert sum(pages, []) == sorted(ids, reverse=True)
    monkeypatch.setattr(store_operator, "MAX_LIST_BYTES", 10)  # one job over it: still shown
    page = client.get("/jobs?limit=50").json
    assert [job["id"] for job in page["jobs"]] == [max(ids)] and page["next_after"] == max(ids)


@pytest.mark.parametrize("query, field", [
    ("state=done", "state"), ("limit=0", "limit"), ("limit=1001", "limit"),
    ("limit=x", "limit"), ("after=-5", "after"), ("type=" + "t" * 300, "type"),
    ("type=a%00b", "type"),
])
def test_list_errors_name_the_parameter(client, query, field):
    reply = client.get(f"/jobs?{query}")
    assert reply.status == 400 and reply.error["field"] == field, reply.body


# -- cancel and retry -----------------------------------------------------------------------


def test_cancel_then_retry(client, conn):
    job_id = enqueue(conn)
    cancelled = client.post(f"/jobs/{job_id}/cancel")
    assert cancelled.status == 200 and cancelled.json["state"] == "cancelled"
    again = client.post(f"/jobs/{job_id}/cancel")
    assert again.status == 409
    assert again.error["code"] == "conflict" and again.error["state"] == "cancelled"
    assert "only scheduled, available, running or retryable" in again.error["message"]
    retried = client.post(f"/jobs/{job_id}/retry")
    assert retried.status == 200 and retried.json["state"] == "available"
    conflict = client.post(f"/jobs/{job_id}/retry")
    assert conflict.status == 409 and conflict.error["state"] == "available"


@pytest.mark.parametrize("action", ["cancel", "retry"])
def test_changing_a_missing_job_is_404(client, action):
    reply = client.post(f"/jobs/424242/{action}")
    assert (reply.status, reply.error["code"]) == (404, "not_found")


# -- health, status, page, metrics, openapi ---------------------------------------------------


def test_healthz_wants_a_leader(client, conn):
    reply = client.get("/healthz")
    assert reply.status == 503
    assert reply.json["checks"]["database"] == {"ok": True}
    assert reply.json["checks"]["leader"]["ok"] is False
    Store(conn).leader_elect("node-a/123", 30)
    reply = client.get("/healthz")
    assert reply.status == 200, reply.json
    assert reply.json["status"] == "ok"
    assert reply.json["checks"]["leader"] == {"ok": True, "node_id": "node-a", "term": 1}


def test_healthz_in_the_daemon_checks_the_master_and_its_workers(dsn, conn):
    Store(conn).leader_elect("node-a/123", 30)
    with ApiServer(make_config(), dsn, status_source=lambda: HEALTHY_STATUS) as server:
        reply = Client(server.url).get("/healthz")
    assert reply.status == 200, reply.json
    assert reply.json["checks"]["workers"] == {"ok": True, "up": 1, "desired": 2}
    assert reply.json["checks"]["master"] == {"ok": True, "state": "running"}

    def unreachable() -> dict[str, Any]:
        raise DaemonUnreachable("/run/pulse.sock", "connection refused")

    with ApiServer(make_config(), dsn, status_source=unreachable) as server:
        reply = Client(server.url).get("/healthz")
    assert reply.status == 503
    assert reply.json["checks"]["master"]["ok"] is False
    assert "connection refused" in reply.json["checks"]["master"]["error"]
    no_workers = {**HEALTHY_STATUS, "children": HEALTHY_STATUS["children"][:1]}
    with ApiServer(make_config(), dsn, status_source=lambda: no_workers) as server:
        reply = Client(server.url).get("/healthz")
    assert reply.status == 503 and reply.json["checks"]["workers"]["up"] == 0


def test_status_json_has_the_daemon_status_and_the_last_failures(dsn, conn):
    failed = enqueue(conn, "broken", max_attempts=1)
    registry = HandlerRegistry()
    registry.register("broken", lambda job: 1 / 0)
    pulsed.run_worker(dsn, registry=registry, max_jobs=1)
    with ApiServer(make_config(), dsn, status_source=lambda: HEALTHY_STATUS) as server:
        data = Client(server.url).get("/status.json").json
    assert data["master"]["node_id"] == "node-a" and len(data["children"]) == 3
    assert data["queues"] == HEALTHY_STATUS["queues"]
    [failure] = data["failures"]
    assert failure["id"] == failed and "ZeroDivisionError" in failure["last_error"]


def test_status_json_without_a_daemon_reads_the_queues_itself(client, conn):
    enqueue(conn)
    data = client.get("/status.json").json
    assert data["queues"] == [{"type": "email", "state": "available", "count": 1}]
    assert "status_error" in data and data["failures"] == []


def test_the_status_page_is_served_with_no_build_step(client):
    reply = client.get("/")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in reply.headers["Content-Security-Policy"]
    assert b'fetch("status.json"' in reply.body and b"<table id=\"children\">" in reply.body


def test_metrics_include_queue_depth_and_leader_from_the_database(client, conn):
    enqueue(conn, "email")
    enqueue(conn, "email")
    enqueue(conn, "sms", delay=60)
    Store(conn).leader_elect("elsewhere/1", 30)
    client.post("/jobs", {"type": "email"})
    reply = client.get("/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    text = reply.body.decode()
    assert 'pulse_queue_depth{state="available",type="email"} 3.0' in text
    assert 'pulse_queue_depth{state="scheduled",type="sms"} 1.0' in text
    assert "pulse_database_up 1.0" in text
    assert "pulse_leader_elected 1.0" in text and "pulse_leader_is_local 0.0" in text
    assert "pulse_leader_term 1.0" in text
    assert 'pulse_jobs_enqueued_total{source="http",type="email"}' in text
    promtool_check(text)
    openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert openmetrics.body.rstrip().endswith(b"# EOF")


def test_metrics_include_the_oldest_job_age_by_type_and_state(client, conn):
    """pulse_queue_oldest_job_age_seconds needs Store.queue_ages (the
    `queue_ages` query); without it only the overall oldest available age
    is exported."""
    waiting = enqueue(conn, "email")
    enqueue(conn, "sms", delay=600)
    conn.execute("UPDATE pulse_jobs SET run_at = now() - interval '90 seconds' WHERE id = %s",
                 (waiting,))
    families = {family.name: family.samples for family in
                text_string_to_metric_families(client.get("/metrics").body.decode())}
    [oldest] = families["pulse_queue_oldest_available_age_seconds"]
    assert 89 < oldest.value < 120
    ages = {(s.labels["type"], s.labels["state"]): s.value
            for s in families.get("pulse_queue_oldest_job_age_seconds", [])}
    assert 89 < ages[("email", "available")] < 120, ages
    assert 0 <= ages[("sms", "scheduled")] < 30, ages


def test_openapi_describes_every_route(client):
    reply = client.get("/openapi.json")
    assert reply.status == 200
    doc = reply.json
    assert doc["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = {(re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", r"{\1}", pattern.pattern.replace("\\.", ".")),
               method) for pattern, methods in ROUTES for method in methods}
    assert documented == served


# -- the protocol: methods, sizes, tokens ----------------------------------------------------


def test_unknown_paths_and_methods_get_json_errors(client):
    missing = client.get("/nope")
    assert (missing.status, missing.error["code"]) == (404, "not_found")
    wrong = client.call("DELETE", "/jobs")
    assert (wrong.status, wrong.headers["Allow"]) == (405, "GET, POST")
    assert client.call("PUT", "/jobs/1/cancel").status == 405
    odd = client.call("BREW", "/jobs")
    assert (odd.status, odd.error["code"]) == (501, "not_implemented")
    head = client.call("HEAD", "/healthz")
    assert head.body == b"" and int(head.headers["Content-Length"]) > 0


def test_a_body_over_the_limit_is_413(client):
    big = b'{"type": "email", "payload": {"x": "' + b"a" * api_http.MAX_BODY_BYTES + b'"}}'
    reply = client.post("/jobs", big)
    assert (reply.status, reply.error["code"]) == (413, "payload_too_large")
    assert reply.closed


def test_expect_100_continue_over_the_limit_is_refused_before_the_body(server):
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 99999999\r\n\r\n")
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413")


def test_expect_100_continue_within_the_limit_gets_100_then_the_answer(server):
    parts = urlsplit(server.url)
    body = b'{"type": "email"}'
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(4096).startswith(b"HTTP/1.1 100")
        sock.sendall(body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 201")


def test_chunked_bodies_and_bad_lengths_are_refused(server):
    parts = urlsplit(server.url)
    for request, status in (
            (b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"0\r\n\r\n", b"411"),
            (b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: -3\r\n\r\n", b"400"),
            (b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n{}",
             b"400"),
            (b"GARBAGE\r\n\r\n", b"400")):
        with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
            sock.sendall(request)
            if request.endswith(b"{}"):
                sock.shutdown(socket.SHUT_WR)  # the body ends short
            reply = sock.recv(4096)
        assert status in reply.split(b"\r\n", 1)[0] or reply.startswith(b'{"error"'), reply


def test_the_token_is_required_when_set(dsn):
    with ApiServer(make_config(token="s3cret"), dsn) as server:
        anonymous, wrong = Client(server.url), Client(server.url, token="guess")
        right = Client(server.url, token="s3cret")
        reply = anonymous.post("/jobs", {"type": "email"})
        assert (reply.status, reply.error["code"]) == (401, "unauthorized")
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        assert wrong.post("/jobs", {"type": "email"}).status == 401
        assert anonymous.get("/jobs/1", headers={"Authorization": "Basic czNjcmV0"}).status == 401
        assert anonymous.get("/metrics").status == 401
        assert anonymous.get("/status.json").status == 401
        assert right.post("/jobs", {"type": "email"}).status == 201
        assert right.get("/metrics").status == 200
        for public in ("/", "/openapi.json"):
            assert anonymous.get(public).status == 200
        assert anonymous.get("/healthz").status in (200, 503)


def test_a_non_loopback_listen_needs_a_token(dsn):
    with pytest.raises(ConfigError, match="api.token"):
        ApiServer(make_config(listen="0.0.0.0:0"), dsn)
    ApiServer(make_config(listen="0.0.0.0:0", token="t"), dsn).pool.close()


def test_idle_connections_at_the_limit_make_room_for_a_new_one(dsn, monkeypatch):
    monkeypatch.setattr(api_http, "MAX_CONNECTIONS", 2)
    with ApiServer(make_config(), dsn) as server:
        parts = urlsplit(server.url)
        idle = [socket.create_connection((parts.hostname, parts.port), timeout=5)
                for _ in range(2)]
        try:
            assert Client(server.url).get("/openapi.json").status == 200
            assert idle[0].recv(4096) == b""  # the one waiting longest was closed
        finally:
            for sock in idle:
                sock.close()


def test_too_many_busy_connections_get_503(dsn, monkeypatch, conn):
    """Only when every connection has a request being answered is there no room."""
    monkeypatch.setattr(api_http, "MAX_CONNECTIONS", 2)
    Store(conn).leader_elect("node-a/123", 30)
    release, entered = threading.Event(), threading.Semaphore(0)

    def stuck_status() -> dict[str, Any]:
        entered.release()
        release.wait(10)
        return HEALTHY_STATUS

    with ApiServer(make_config(), dsn, status_source=stuck_status) as server, \
            ThreadPoolExecutor(2) as pool:
        stuck = [pool.submit(Client(server.url).get, "/healthz") for _ in range(2)]
        for _ in stuck:
            assert entered.acquire(timeout=10), "a /healthz never reached the status source"
        parts = urlsplit(server.url)
        try:
            with socket.create_connection((parts.hostname, parts.port), timeout=5) as extra:
                assert extra.recv(4096).startswith(b"HTTP/1.1 503")
        finally:
            release.set()
        assert [future.result(timeout=10).status for future in stuck] == [200, 200]


def test_a_database_outage_gives_503_not_500(monkeypatch):
    monkeypatch.setattr(api_http, "POOL_TIMEOUT_S", 0.5)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dead = f"postgresql://nobody@127.0.0.1:{port}/nothing?connect_timeout=1"
    with ApiServer(make_config(), dead) as server:
        client = Client(server.url)
        reply = client.post("/jobs", {"type": "email"})
        assert (reply.status, reply.error["code"]) == (503, "unavailable")
        assert client.get("/healthz").json["checks"]["database"]["ok"] is False
        assert "pulse_database_up 0.0" in client.get("/metrics").body.decode()
