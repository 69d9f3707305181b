"""The operator's console (issue 19): its page and assets, the JSON it
reads (job browser, one job, the cluster, the charts) and its actions (bulk
retry / cancel / delete by filter, pause and resume a queue).

Reads follow the API's token rule (server.py). Actions always need a token
(api.token, or one of the named api.tokens) and are logged with its name;
without one they get 401, so a page without a token is read-only. The job
table and the cluster table are rendered on the server (they work without
JavaScript when reads need no token); console.js adds the charts, live
refresh and the actions."""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

from pulsed import node_commands
from pulsed.config import Config
from pulsed.control.client import ControlClient, DaemonUnreachable
from pulsed.control.protocol import ControlError
from pulsed.db import browse
from pulsed.db.store import Store
from pulsed.http.messages import (HttpError, Request, Response, int_param, invalid,
                                  json_object, json_response, json_type, parse_job_id,
                                  parse_query)
# The filters and the server-rendered views live in console_views.py.
from pulsed.http.console_views import (NAME_LIMIT, _cluster_table, _cursor, _filter_form,
                                       _iso_row, _jobs_table, cluster_view, filter_from_body,
                                       filter_from_query, series)
from pulsed.jobs import JobState
from pulsed.serialize import job_to_dict

log = logging.getLogger("pulsed.http.console")

STATS_WINDOWS = {"5m": 300.0, "1h": 3600.0}
ASSETS = {"console.js": "application/javascript; charset=utf-8",
          "console.css": "text/css; charset=utf-8"}
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; "
                "style-src 'self'; connect-src 'self'; img-src 'self' data:; "
                "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
                "X-Frame-Options": "DENY", "Cache-Control": "no-store"}
CONTROL_TIMEOUT_S = 5.0
PAGE = 50  # jobs per page
_SLOT = re.compile(r"\{\{(jobs|cluster|filters)\}\}")  # console.html's server-rendered parts
PUBLIC = frozenset({"console_page", "console_js", "console_css"})  # no job data without a token

ROUTES: tuple[tuple[str, dict[str, str]], ...] = (
    (r"/console", {"GET": "console_page"}),
    (r"/console/console\.js", {"GET": "console_js"}),
    (r"/console/console\.css", {"GET": "console_css"}),
    (r"/console/jobs\.json", {"GET": "console_jobs"}),
    (r"/console/jobs/(?P<id>[^/]+)\.json", {"GET": "console_job"}),
    (r"/console/cluster\.json", {"GET": "console_cluster"}),
    (r"/console/stats\.json", {"GET": "console_stats"}),
    (r"/console/whoami", {"GET": "console_whoami"}),
    (r"/jobs/bulk/retry", {"POST": "bulk_retry"}),
    (r"/jobs/bulk/cancel", {"POST": "bulk_cancel"}),
    (r"/jobs/bulk/delete", {"POST": "bulk_delete"}),
    (r"/nodes/(?P<node>[^/]+)/drain", {"POST": "node_drain"}),
    (r"/nodes/(?P<node>[^/]+)/resume", {"POST": "node_resume"}),
    (r"/queues/(?P<queue>[^/]+)/pause", {"POST": "queue_pause"}),
    (r"/queues/(?P<queue>[^/]+)/resume", {"POST": "queue_resume"}),
)


class Console:
    """The console's endpoints; `api` is the endpoints.Api they belong to."""

    def __init__(self, config: Config, connect: Callable[[], Any], *, reads_open: bool,
                 status_source: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.config, self.connect, self.reads_open = config, connect, reads_open
        self.status_source = status_source  # this node's master: RSS and restarts
        static = resources.files("pulsed") / "static"
        self.template = (static / "console.html").read_text()
        self.assets = {name: (static / name).read_bytes() for name in ASSETS}
        secrets = [("api.token", config.api.token)] if config.api.token else []
        self.tokens = tuple(secrets + list(config.api.tokens))

    # -- who ---------------------------------------------------------------------

    def who(self, headers: Mapping[str, str]) -> str:
        """The name of the token the request carries; 401 without a valid one."""
        if not self.tokens:
            raise HttpError(401, "unauthorized", "actions need a token, and none is "
                            "configured: add [api] tokens = [\"name:secret\"] to the config")
        scheme, _, given = (headers.get("Authorization") or "").partition(" ")
        given_bytes = given.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() == "bearer":
            for name, secret in self.tokens:
                if hmac.compare_digest(given_bytes, secret.encode("utf-8", "surrogateescape")):
                    return name
        raise HttpError(401, "unauthorized", "actions need a valid token "
                        "(Authorization: Bearer <one of api.tokens>)")

    def console_whoami(self, request: Request) -> Response:
        return json_response(200, {"name": self.who(request.headers)})

    # -- the page ------------------------------------------------------------------

    def console_page(self, request: Request) -> Response:
        query = parse_query(request.query)
        if self.reads_open:
            flt = filter_from_query(query)
            after = _cursor(query)
            with self.connect() as conn:
                store = Store(conn)
                rows, next_page = browse.list_page(store, flt, after=after, limit=PAGE)
                count, exact = browse.count_capped(store, flt)
                processes = browse.cluster_processes(store)
                leader = store.leader_get()
            jobs_html = _jobs_table(rows, count, exact, query, next_page)
            cluster_html = _cluster_table(cluster_view(processes, leader, self._local()))
        else:
            jobs_html = cluster_html = ('<p class="dim">Reading needs the API token: enter it '
                                        'above (JavaScript is needed to send it).</p>')
        parts = {"jobs": jobs_html, "cluster": cluster_html, "filters": _filter_form(query)}
        # One pass: a job's text that reads "{{cluster}}" stays text.
        page = _SLOT.sub(lambda m: parts[m.group(1)], self.template)
        return Response(200, page.encode(), "text/html; charset=utf-8", dict(PAGE_HEADERS))

    def console_js(self, request: Request) -> Response:
        return self._asset("console.js")

    def console_css(self, request: Request) -> Response:
        return self._asset("console.css")

    def _asset(self, name: str) -> Response:
        return Response(200, self.assets[name], ASSETS[name], {"Cache-Control": "no-cache"})

    # -- reads ---------------------------------------------------------------------

    def console_jobs(self, request: Request) -> Response:
        query = parse_query(request.query)
        flt = filter_from_query(query)
        limit = int_param(query, "limit", 1, browse.MAX_PAGE, PAGE) or PAGE
        after = _cursor(query)
        with self.connect() as conn:
            store = Store(conn)
            rows, next_page = browse.list_page(store, flt, after=after, limit=limit)
            count, exact = browse.count_capped(store, flt)
        return json_response(200, {
            "jobs": [_iso_row(r) for r in rows], "count": count, "count_exact": exact,
            "next_after": next_page.text() if next_page else None, "limit": limit})

    def console_job(self, request: Request) -> Response:
        job_id = parse_job_id(request.params["id"])
        with self.connect() as conn:
            store = Store(conn)
            record = store.get_job(job_id)
            lease = browse.job_lease(store, job_id) if record is not None else None
        if record is None:
            raise HttpError(404, "not_found", f"no job with id {job_id}", "id")
        job = job_to_dict(record)
        job["lease"] = _iso_row(lease) if lease and record.state is JobState.RUNNING else None
        return json_response(200, job)

    def console_cluster(self, request: Request) -> Response:
        with self.connect() as conn:
            store = Store(conn)
            processes = browse.cluster_processes(store)
            leader = store.leader_get()
            paused = store.paused_queues()
        return json_response(200, {"nodes": cluster_view(processes, leader, self._local()),
                                   "paused_queues": paused,
                                   "this_node": self.config.daemon.node_id})

    def console_stats(self, request: Request) -> Response:
        query = parse_query(request.query)
        window = query.get("window", "5m")
        if window not in STATS_WINDOWS:
            raise invalid("window", f"window must be one of {', '.join(STATS_WINDOWS)}, "
                                    f"got {window[:20]!r}")
        with self.connect() as conn:
            rows = browse.stats_series(Store(conn), STATS_WINDOWS[window])
        return json_response(200, series(rows, STATS_WINDOWS[window]))

    def _local(self) -> tuple[str, dict[int, Mapping[str, Any]]]:
        """This node's id and its children by pid, from the master's status
        (RSS and restarts are not in the registry); empty if it does not answer."""
        children: dict[int, Mapping[str, Any]] = {}
        if self.status_source is not None:
            try:
                children = {c["pid"]: c for c in self.status_source().get("children") or []
                            if isinstance(c, Mapping) and "pid" in c}
            except Exception as exc:  # noqa: BLE001 - the registry's view still shows
                log.debug("console: no local status: %s", exc)
        return self.config.daemon.node_id, children

    # -- actions -------------------------------------------------------------------

    def bulk_retry(self, request: Request) -> Response:
        return self._bulk(request, "retry")

    def bulk_cancel(self, request: Request) -> Response:
        return self._bulk(request, "cancel")

    def bulk_delete(self, request: Request) -> Response:
        return self._bulk(request, "delete")

    def _bulk(self, request: Request, action: str) -> Response:
        who = self.who(request.headers)
        data = json_object(request.body) if request.body.strip() else {}
        dry_run = data.pop("dry_run", False)
        if not isinstance(dry_run, bool):
            raise invalid("dry_run", f"dry_run must be true or false, got {json_type(dry_run)}")
        flt = filter_from_body(data)
        if flt.is_empty():
            raise invalid(None, "a bulk action needs a filter (id, state, type, queue, "
                                "older_than or error); refusing to act on every job")
        with self.connect() as conn:
            store = Store(conn)
            if dry_run:
                count = browse.bulk_count(store, action, flt)
                return json_response(200, {"action": action, "dry_run": True,
                                           "matched": count, "filter": flt.describe()})
            result = browse.bulk_apply(store, action, flt, who=who)
        return json_response(200, {"action": action, "dry_run": False, "by": who,
                                   "matched": result.matched, "changed": result.changed,
                                   "skipped": result.skipped, "batches": result.batches,
                                   "filter": flt.describe()})

    def node_drain(self, request: Request) -> Response:
        return self._node(request, "drain")

    def node_resume(self, request: Request) -> Response:
        return self._node(request, "resume")

    def _node(self, request: Request, verb: str) -> Response:
        """Drain or resume a node: this one through its master's control
        socket; another through the database (pulsed/node_commands.py),
        waiting a few seconds for that node to acknowledge (202 if it has
        not yet: the request stays pending for it)."""
        who = self.who(request.headers)
        node, here = request.params["node"], self.config.daemon.node_id
        if len(node) > NAME_LIMIT or not node.isprintable():
            raise invalid("node", "a node id is at most 255 printable characters")
        if node != here:
            return self._remote_node(node, verb, who)
        try:
            result = ControlClient(self.config.daemon.socket_path, timeout=CONTROL_TIMEOUT_S
                                   ).request(verb)
        except (DaemonUnreachable, ControlError) as exc:
            raise HttpError(503, "unavailable", f"the master did not {verb}: {exc}") from None
        log.info("node %s: %s by %s", node, verb, who)
        return json_response(200, {"node": node, "action": verb, "by": who,
                                   "state": result.get("state") if isinstance(result, dict)
                                   else None})

    def _remote_node(self, node: str, verb: str, who: str) -> Response:
        here = self.config.daemon.node_id
        with self.connect() as conn:
            store = Store(conn)
            try:
                command_id = node_commands.request(store, node, verb, who=who, here=here)
            except node_commands.NodeRefused as exc:
                raise HttpError(exc.status, "not_found" if exc.status == 404 else "conflict",
                                str(exc), "node") from None
            outcome = node_commands.wait_done(store, command_id)
        reply = {"node": node, "action": verb, "by": who, "command": command_id}
        if outcome is None:
            return json_response(202, {**reply, "state": None, "pending": True})
        if "error" in outcome:
            raise HttpError(502, "node_failed", f"node {node[:100]!r} did not {verb}: "
                                                f"{outcome['error']}", "node")
        return json_response(200, {**reply, "state": outcome.get("state"), "pending": False})

    def queue_pause(self, request: Request) -> Response:
        return self._queue(request, "pause")

    def queue_resume(self, request: Request) -> Response:
        return self._queue(request, "resume")

    def _queue(self, request: Request, verb: str) -> Response:
        who = self.who(request.headers)
        queue = request.params["queue"]
        if len(queue) > NAME_LIMIT or not queue.isprintable():
            raise invalid("queue", "a queue name is at most 255 printable characters")
        with self.connect() as conn:
            store = Store(conn)
            (store.pause_queue if verb == "pause" else store.resume_queue)(queue)
            paused = store.paused_queues()
        log.info("queue %s %sd by %s", queue, verb, who)
        return json_response(200, {"queue": queue, "paused": queue in paused, "by": who})

