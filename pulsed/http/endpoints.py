"""The HTTP API's endpoints, apart from the socket server: the routes, and
for each a method of Api that takes a Request and returns a Response."""

from __future__ import annotations

import collections
import itertools
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from importlib import resources
from typing import Any
from urllib.parse import unquote_to_bytes

import psycopg

from pulsed import metrics
from pulsed.api import MAX_PAYLOAD_BYTES, job_params
from pulsed.config import Config
from pulsed.db.store import Store
from pulsed.errors import JobInputError, PulseError
from pulsed.http import console
from pulsed.http.enqueue_group import EnqueueGroup, Enqueued
from pulsed.http.long_poll import Blocking, JobEnds, wait_for_end
from pulsed.http.messages import (MAX_ID, HttpError, Request, Response, first_line, float_param,
                                  int_param, invalid, json_object, json_response, json_type,
                                  parse_job_id, parse_query, parse_timestamp)
from pulsed.jobs import CANCELLABLE_STATES, RETRYABLE_STATES, JobState
from pulsed.serialize import job_to_dict
from pulsed.status_report import StatusReport

log = logging.getLogger("pulsed.http")

DEFAULT_LIMIT, MAX_LIMIT = 50, 1000
MAX_JOB_BODY_BYTES = MAX_PAYLOAD_BYTES + 64 * 1024  # the largest payload, plus the envelope
MAX_BULK_JOBS = 10_000  # jobs in one POST /jobs array: one transaction
# An array's jobs are checked and sent this many at a time: the database
# inserts one chunk while the next is checked (see inserted_keyless_chunks).
# The price: a bad item after the first chunk is found once the chunks before
# it were inserted, and they are rolled back (dead rows for the vacuum, as
# many as the same jobs would leave once run; ids skipped).
BULK_CHUNK = 200
# an array's body: 10,000 jobs of ~1.6 KiB each; larger payloads go in fewer per request
MAX_BULK_BODY_BYTES = 16 * 1024 * 1024
MAX_WAIT_S = 60.0  # GET /jobs/{id}?wait=: a socket and a waiter row that long
FAILURES_SHOWN = 10
JOB_FIELDS = ("type", "payload", "priority", "queue", "delay", "run_at", "max_attempts",
              "idempotency_key", "timeout", "unique_while", "unique_for")
# no token needed: they hold no job data
PUBLIC = frozenset({"page", "healthz", "openapi"}) | console.PUBLIC
HTML_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
                "base-uri 'none'; frame-ancestors 'none'", "X-Frame-Options": "DENY"}

StatusSource = Callable[[], Mapping[str, Any]]


ROUTES: tuple[tuple[re.Pattern[str], dict[str, str]], ...] = tuple(
    (re.compile(pattern), methods) for pattern, methods in (
        (r"/", {"GET": "page"}),
        (r"/status\.json", {"GET": "status"}),
        (r"/healthz", {"GET": "healthz"}),
        (r"/readyz", {"GET": "healthz"}),  # serving means healthy here: the same checks
        (r"/metrics", {"GET": "metrics_text"}),
        (r"/openapi\.json", {"GET": "openapi"}),
        (r"/jobs", {"GET": "list_jobs", "POST": "create_job"}),
        *console.ROUTES,  # before /jobs/{id}/...: /jobs/bulk/retry is theirs
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
        return name, {key: _path_parameter(key, value) for key, value in match.groupdict().items()}
    raise HttpError(404, "not_found", f"no endpoint at {path[:200]}")


def _path_parameter(key: str, raw: str) -> str:
    """A path segment as the client meant it: percent-decoded (the console
    encodes a queue or node name with encodeURIComponent; taken raw,
    `POST /queues/eu%20west/pause` paused a queue named "eu%20west")."""
    try:  # the head was read as latin-1: its bytes back, then UTF-8 (raw or %-encoded)
        return unquote_to_bytes(raw.encode("latin-1")).decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(key, f"{key} in the path is not UTF-8 once percent-decoded") from None


class Api:
    """The endpoints, apart from the socket server: a Request in, a Response out."""

    def __init__(self, config: Config, connect: Callable[[], Any], *,
                 status_source: StatusSource | None = None, board: Any = None,
                 reads_open: bool = True, enqueuer: EnqueueGroup | None = None,
                 max_job_body: int = MAX_JOB_BODY_BYTES,
                 max_bulk_body: int = MAX_BULK_BODY_BYTES) -> None:
        self.config = config
        self.enqueuer = enqueuer  # single-job enqueues committed together; None: each alone
        self.max_job_body, self.max_bulk_body = max_job_body, max_bulk_body
        self.console = console.Console(config, connect, reads_open=reads_open,
                                       status_source=status_source)
        self.connect = connect  # () -> a connection context manager (a pool's)
        self.status_source = status_source
        self.registry = metrics.exposition_registry(
            connect=connect, node_id=config.daemon.node_id, board=board,
            master_pid=os.getppid() if board is not None else None)  # the api child's parent
        static = resources.files("pulsed") / "static"
        self.page_html = (static / "status.html").read_bytes()
        self.openapi_json = (static / "openapi.json").read_bytes()

    def handle(self, name: str, request: Request) -> Response:
        try:
            return (getattr(self, name, None) or getattr(self.console, name))(request)
        except ANSWERED as exc:
            return error_response(exc)

    async def create_job_async(self, request: Request) -> Response:
        """create_job of one small job on the event loop: no handler thread,
        the enqueue group inserts it (see EnqueueGroup.enqueue_async)."""
        assert self.enqueuer is not None
        try:
            params = self._single_params(request, json_object(request.body))
            done = await self.enqueuer.enqueue_async(params)
        except ANSWERED as exc:
            return error_response(exc)
        return self._created(params, done)

    # -- jobs ---------------------------------------------------------------------

    def create_job(self, request: Request) -> Response:
        """POST /jobs: one job object (grouped with concurrent requests into
        one transaction, see enqueue_group.py), or an array of them (one
        transaction of its own: all inserted, or none)."""
        data = json_object(request.body, arrays=True)
        if isinstance(data, list):
            return self._create_jobs(data)
        params = self._single_params(request, data)
        done = self.enqueuer.enqueue(params) if self.enqueuer else self._insert_alone(params)
        return self._created(params, done)

    def _single_params(self, request: Request, data: dict[str, Any]) -> dict[str, Any]:
        if len(request.body) > self.max_job_body:
            raise HttpError(413, "payload_too_large", f"the body is {len(request.body)} bytes; "
                            f"the limit for one job is {self.max_job_body} (for an array of "
                            f"jobs {self.max_bulk_body})")
        return job_params(**self._job_options(data))

    def _created(self, params: dict[str, Any], done: Enqueued) -> Response:
        """The answer to one job's POST /jobs (counted by whoever inserted it:
        the enqueue group once per group, _insert_alone once per job)."""
        job_id, created = done.inserted.id, done.inserted.created
        job = job_to_dict(done.record) if done.record is not None else {"id": job_id}
        return json_response(201 if created else 200, job, Location=f"/jobs/{job_id}")

    def _insert_alone(self, params: dict[str, Any]) -> Enqueued:
        """One job in its own transaction (an Api without an enqueue group)."""
        with self.connect() as conn, conn.transaction():
            store = Store(conn)
            inserted = store.inserted_jobs([params], answer=True)[0]
            record = store.get_job(inserted.id, with_attempts=False)
        if inserted.created:
            metrics.jobs_enqueued(params["type"], "http")
        return Enqueued(inserted, record)

    def _create_jobs(self, items: list[Any]) -> Response:
        """POST /jobs with an array: 201 and [{"id", "state", "created"}, ...]
        in input order; one bad item: 400 naming it, nothing inserted."""
        if len(items) > MAX_BULK_JOBS:
            raise HttpError(413, "payload_too_large", f"the array has {len(items)} jobs; the "
                            f"limit is {MAX_BULK_JOBS} per request")
        if not items:
            return json_response(201, [])
        batch: list[dict[str, Any]] = []
        if any(isinstance(item, dict) and item.get("idempotency_key") is not None
               for item in items):
            # a held key takes more statements, each after the one before
            batch = [self._bulk_item(index, item) for index, item in enumerate(items)]
            with self.connect() as conn, conn.transaction():
                inserted = Store(conn).inserted_jobs(batch)
        else:
            chunks = self._checked_chunks(items, batch)
            first = next(chunks)  # a bad item there: refused before taking a connection
            with self.connect() as conn, conn.transaction():
                inserted = Store(conn).inserted_keyless_chunks(itertools.chain([first], chunks))
        created = collections.Counter(params["type"] for params, item in zip(batch, inserted)
                                      if item.created)
        for job_type, count in created.items():  # one increment per type, not per job
            metrics.jobs_enqueued(job_type, "http", count)
        return json_response(201, [{"id": item.id, "state": item.state, "created": item.created}
                                   for item in inserted])

    def _checked_chunks(self, items: list[Any], checked: list[dict[str, Any]]
                        ) -> Iterator[list[dict[str, Any]]]:
        """The items' job_params, BULK_CHUNK at a time, each also appended
        to `checked`; a bad item raises when its chunk is reached."""
        for start in range(0, len(items), BULK_CHUNK):
            chunk = [self._bulk_item(index, item)
                     for index, item in enumerate(items[start:start + BULK_CHUNK], start)]
            checked += chunk
            yield chunk

    def _bulk_item(self, index: int, item: Any) -> dict[str, Any]:
        """job_params of an array's item; its errors name it: jobs[17].priority."""
        where = f"jobs[{index}]"
        if not isinstance(item, dict):
            raise invalid(where, f"{where} must be a JSON object, got {json_type(item)}")
        try:
            return job_params(**self._job_options(item))
        except JobInputError as exc:
            raise invalid(f"{where}.{exc.argument}",
                          f"{where}.{exc.argument} {exc.problem}") from None
        except HttpError as exc:
            field = f"{where}.{exc.field}" if exc.field else where
            message = exc.message
            message = (f"{where}.{message}" if exc.field and message.startswith(exc.field)
                       else f"{where}: {message}")
            raise HttpError(exc.status, exc.code, message, field, **exc.extra) from None

    def _job_options(self, data: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(data) - set(JOB_FIELDS))
        if unknown:
            raise invalid(unknown[0], f"unknown field {unknown[0]!r}; a job takes "
                                      f"{', '.join(JOB_FIELDS)}")
        options = {key: value for key, value in data.items() if value is not None}
        job_type = options.get("type")
        if job_type is None:
            raise invalid("type", "type is required (the job type, e.g. \"email\")")
        if not isinstance(job_type, str):
            raise invalid("type", f"type must be a string, got {json_type(job_type)}")
        if "run_at" in options:
            options["run_at"] = parse_timestamp("run_at", options["run_at"])
        defaults = self.config.type_config(job_type)
        for key in ("priority", "max_attempts", "timeout"):
            if key not in options and getattr(defaults, key) is not None:
                options[key] = getattr(defaults, key)
        return options

    async def get_job_async(self, request: Request, ends: JobEnds, run: Blocking) -> Response:
        """GET /jobs/{id}; ?wait=SECONDS (at most MAX_WAIT_S) answers once
        the job is finished or the time is up (a long poll: the job as it
        is then, 200 either way; its state says which). On the event loop:
        a long poll holds a pooled connection only for a moment at each end
        (long_poll.py)."""
        try:
            job_id = parse_job_id(request.params["id"])
            query = parse_query(request.query)
            wait_s = float_param(query, "wait", 0.0, MAX_WAIT_S) if "wait" in query else 0.0
            record = await wait_for_end(ends, run, self.connect, job_id, wait_s)
        except ANSWERED as exc:
            return error_response(exc)
        if record is None:
            return error_response(_not_found(job_id))
        return json_response(200, job_to_dict(record))

    def list_jobs(self, request: Request) -> Response:
        query = parse_query(request.query)
        state = query.get("state")
        if state is not None and state not in {s.value for s in JobState}:
            raise invalid("state", f"state must be one of {', '.join(s.value for s in JobState)}")
        job_type = query.get("type")
        if job_type is not None and (len(job_type) > 255 or "\x00" in job_type):
            raise invalid("type", "type must be at most 255 characters, without NUL")
        limit = int_param(query, "limit", 1, MAX_LIMIT, DEFAULT_LIMIT)
        after = int_param(query, "after", 1, MAX_ID, None)
        with self.connect() as conn:
            records, next_after = Store(conn).list_jobs_page(state=state, type=job_type,
                                                             after=after, limit=limit)
        return json_response(200, {"jobs": [job_to_dict(r) for r in records],
                                   "next_after": next_after, "limit": limit})

    def cancel_job(self, request: Request) -> Response:
        return self._change(request, Store.cancel, "cancelled", CANCELLABLE_STATES)

    def retry_job(self, request: Request) -> Response:
        return self._change(request, Store.retry, "retried", RETRYABLE_STATES)

    def _change(self, request: Request, action: Callable[[Store, int], bool], verb: str,
                allowed: tuple[str, ...]) -> Response:
        job_id = parse_job_id(request.params["id"])
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
            checks["database"] = {"ok": False, "error": first_line(exc)}
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
            data["database_error"] = first_line(exc)
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
    report = StatusReport.from_json(status)
    master = report.master
    up = sum(1 for c in report.children
             if c.role == "worker" and c.state in ("idle", "busy", "draining"))
    desired = master.workers_desired
    workers: dict[str, Any] = {"ok": up > 0 or desired == 0, "up": up, "desired": desired}
    if master.degraded:  # the master's word: it knows why (boot errors)
        workers.update(ok=False, error=master.degraded_reason)
    elif not workers["ok"]:
        workers["error"] = f"no worker up (0 of {desired})"
    state = master.state
    return {"master": {"ok": state != "stopping", "state": state}, "workers": workers}


# What an endpoint raises that error_response answers; anything else is a bug (500)
ANSWERED = (JobInputError, HttpError, psycopg.DataError, psycopg.OperationalError)


def error_response(exc: BaseException) -> Response:
    """The answer to one of ANSWERED."""
    if isinstance(exc, JobInputError):
        exc = invalid(exc.argument, f"{exc.argument} {exc.problem}")
    if isinstance(exc, HttpError):
        return json_response(exc.status, exc.body())
    if isinstance(exc, psycopg.OperationalError):
        log.warning("api: database unavailable: %s", first_line(exc))
        return json_response(503, HttpError(503, "unavailable", "the database is "
                                            "unavailable; try again").body())
    # psycopg.DataError: the database refused a value we let through
    return json_response(400, invalid(None, f"the database refused the request: "
                                      f"{first_line(exc)}").body())


def _not_found(job_id: int) -> HttpError:
    return HttpError(404, "not_found", f"no job with id {job_id}", "id")


def _leader_node(row: Mapping[str, Any] | None) -> str | None:
    return row["leader_id"].rsplit("/", 1)[0] if row else None
