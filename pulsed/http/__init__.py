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
    GET  /console              the operator's console (console.py): jobs, cluster, charts
    POST /jobs/bulk/{retry,cancel,delete}
                               {"state": "failed", "type": ..., "dry_run": true}: by filter,
                               in batches; needs a named token (api.tokens), logged with it

Every error is JSON: {"error": {"code": ..., "message": ..., "field": ...}};
a bug gives 500 "internal" with the traceback in the log, never in the reply.
With api.token set (or off loopback), every endpoint but /, /healthz,
/openapi.json and the console's page wants "Authorization: Bearer <token>"
(api.token or a named api.tokens one, compared in constant time); actions
always want one.

The daemon runs it in its "api" child (`api_main`); tests and embedders run
`ApiServer(config, dsn)` in-process. On by default on 127.0.0.1:8080;
browsers on other origins cannot write and unknown Host names (DNS
rebinding) are refused (`guard`). Connections are read by asyncio (on uvloop) and
parsed by httptools (llhttp, strict HTTP/1.1), each request whole within a deadline
before a handler thread sees it, so slow clients cost a socket, not a
thread; a short pool of database connections, bounded bodies.

Seven modules: `console` (the operator's console and bulk actions),
`messages` (requests, responses, errors, and the checks on what a client
sent), `endpoints` (the routes and what each does: a Request
in, a Response out), `guard` (Host, Origin and Content-Type rules), `wire`
(one connection: the parser, deadlines, one write per response), `server` (the
listener, the connection table, the handler threads) and `child` (the
daemon's "api" child).
"""

from pulsed.http.endpoints import JOB_FIELDS, ROUTES, Api
from pulsed.http.child import api_main
from pulsed.http.server import ApiServer

__all__ = ["JOB_FIELDS", "ROUTES", "Api", "ApiServer", "api_main"]
