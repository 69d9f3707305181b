"""`pulsed --role worker|scheduler|api`: one role in this process, no master.

For orchestrators (Kubernetes, Nomad) that run one process per container
and restart it themselves. The role runs exactly as a master's child would
(the same main function, board slot, signals and exit codes), with what
the master did for it done here instead:

- probes: `GET /healthz` (alive: heartbeat fresh, no job past its timeout;
  a failing liveness probe is how a hung job gets its process restarted)
  and `GET /readyz` (serving: started, reaching the database, not
  stopping), on `daemon.health_listen`. The api role has both on its own
  port already.
- a stop: TERM drains (no new claims, running jobs finish); past
  `daemon.stop_timeout` the process exits anyway and its jobs come back at
  lease expiry.
- the process registry: a worker heartbeats its own row, so the cluster
  knows which types a live worker handles.

Nobody releases a dead worker's leases at once: the leader's reaper does,
at lease expiry (`worker.lease_ttl`). docs/roles.md says what that costs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg

from pulsed.board import Board, ChildState
from pulsed.children import ChildContext, ChildRuntime, prepare_process
from pulsed.config import Config
from pulsed.db.connect import connect
from pulsed.db.store import Store
from pulsed.errors import EXIT_OK
from pulsed.listener import ApiListener
from pulsed.master.table import HARD_TIMEOUT_GRACE_S
from pulsed.roles import ROLE_MAINS

log = logging.getLogger(__name__)

ROLES = ("worker", "scheduler", "api")
REGISTRY_HEARTBEAT_S = 5.0
READY_STATES = (ChildState.IDLE, ChildState.BUSY)


def run_role(config: Config, dsn: str, role: str) -> int:
    board = Board()
    listener = ApiListener().for_child(config.api.listen) if role == "api" else None
    ctx = ChildContext(role=role, index=1 if role == "worker" else 0, slot=0, board=board,
                       config=config, dsn=dsn, master_pid=os.getppid(), after_fork=lambda: None,
                       listener=listener, alone=True)
    board.reset(0, role, ctx.index)
    runtime = prepare_process(ctx)
    _stop_deadline_on_term(runtime, config.daemon.stop_timeout)
    probes = None
    if role != "api":
        probes = ProbeServer(config.daemon.health_listen, runtime)
        probes.start()
    if role == "worker":
        RegistryHeartbeat(runtime).start()
    log.info("pulsed %s running alone (no master); probes on %s", role,
             config.daemon.health_listen if probes else config.api.listen)
    try:
        return ROLE_MAINS[role](runtime)
    finally:
        if probes is not None:
            probes.shutdown()


def _stop_deadline_on_term(runtime: ChildRuntime, stop_timeout: float) -> None:
    """TERM asks the role to finish its jobs; past stop_timeout it exits
    anyway (the orchestrator would SIGKILL it soon after)."""
    def graceful(signum: int, frame: object) -> None:
        if runtime.stop_requested:
            return
        runtime.stop_requested = True  # only a flag: never raise mid-commit
        timer = threading.Timer(stop_timeout, _stop_overran, args=(stop_timeout,))
        timer.daemon = True
        timer.start()
    signal.signal(signal.SIGTERM, graceful)
    signal.signal(signal.SIGINT, graceful)  # run by hand in a terminal: Ctrl-C stops


def _stop_overran(stop_timeout: float) -> None:
    log.warning("still running %gs after TERM (daemon.stop_timeout); exiting: the jobs "
                "still running come back at lease expiry", stop_timeout)
    logging.shutdown()
    os._exit(EXIT_OK)


def health(runtime: ChildRuntime, now: float) -> tuple[bool, str]:
    """Liveness: the monitor thread heartbeats and no job ran past its
    timeout (a master would kill the process then; here the probe says so)."""
    view = runtime.ctx.board.read(runtime.ctx.slot)
    timeout = runtime.ctx.config.worker.heartbeat_timeout
    if now - view.heartbeat > timeout:
        return False, f"no heartbeat for {now - view.heartbeat:.0f}s"
    overdue = [e.job_id for e in view.running
               if e.deadline is not None and now > e.deadline + HARD_TIMEOUT_GRACE_S]
    if overdue:
        return False, f"job(s) {overdue} ran past their timeout"
    return True, "ok"


def readiness(runtime: ChildRuntime) -> tuple[bool, str]:
    view = runtime.ctx.board.read(runtime.ctx.slot)
    if runtime.should_stop():
        return False, "stopping"
    if view.database_error:
        return False, f"database unreachable: {view.database_error}"
    if view.state not in READY_STATES:
        return False, view.state.name.lower()
    return True, view.state.name.lower()


class ProbeServer(threading.Thread):
    """The two probe endpoints, on a thread of their own (stdlib http.server:
    two GETs from the orchestrator's kubelet, not a public API)."""

    def __init__(self, listen: str, runtime: ChildRuntime) -> None:
        super().__init__(name="pulse-probes", daemon=True)
        host, _, port = listen.rpartition(":")
        handler = _probe_handler(runtime)
        self.server = ThreadingHTTPServer((host.strip("[]"), int(port)), handler)
        self.server.daemon_threads = True

    def run(self) -> None:
        self.server.serve_forever(poll_interval=0.5)

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _probe_handler(runtime: ChildRuntime) -> type[BaseHTTPRequestHandler]:
    class Probe(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path == "/healthz":
                ok, detail = health(runtime, time.monotonic())
            elif self.path == "/readyz":
                ok, detail = readiness(runtime)
            else:
                self._reply(404, {"error": f"no such probe {self.path!r}: /healthz, /readyz"})
                return
            self._reply(200 if ok else 503, {"status": "ok" if ok else "fail",
                                              "role": runtime.ctx.role, "detail": detail})

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds would drown the log

    return Probe


class RegistryHeartbeat(threading.Thread):
    """A lone worker's row in the process registry (a master's scheduler
    writes it otherwise): the leader counts a type as handled only while a
    live worker lists it."""

    def __init__(self, runtime: ChildRuntime) -> None:
        super().__init__(name="pulse-registry", daemon=True)
        self.runtime = runtime

    def run(self) -> None:
        ctx = self.runtime.ctx
        row = {"role": "worker", "idx": ctx.index, "pid": os.getpid()}
        while not self.runtime.should_stop():
            try:
                with connect(ctx.dsn, "worker", instance="registry",
                             pooler=ctx.config.database.pooler) as conn:
                    view = ctx.board.read(ctx.slot)
                    Store(conn).processes_heartbeat(ctx.config.daemon.node_id, [{
                        **row, "info": {"state": view.state.name.lower(),
                                        "jobs_done": view.jobs_done}}])
            except psycopg.Error as exc:
                log.warning("could not refresh the process registry: %s", exc)
            time.sleep(REGISTRY_HEARTBEAT_S)
