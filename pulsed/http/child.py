"""The daemon's "api" child: the HTTP API server, run until the master asks
it to stop, with the master's status from the control socket."""

from __future__ import annotations

import errno
import logging
import sys
import time

from pulsed.board import ChildState
from pulsed.children import ChildRuntime, boot_failed, exit_code_for
from pulsed.control.client import ControlClient
from pulsed.errors import PulseError
from pulsed.http.server import ApiServer

log = logging.getLogger("pulsed.http")

STATUS_TIMEOUT_S = 2.0  # asking the master for its status
BIND_RETRY_S = 5.0  # binding by itself (the master could not): the port may free up
LOOP_SLEEP_S = 0.2
SWITCH_INTERVAL_S = 0.0005  # see api_main


def api_main(runtime: ChildRuntime) -> int:
    """The daemon's "api" child: serve until asked to stop."""
    ctx = runtime.ctx
    client = ControlClient(ctx.config.daemon.socket_path, timeout=STATUS_TIMEOUT_S)
    try:
        server = ApiServer(ctx.config, ctx.dsn, board=ctx.board,  # alone: no master to ask
                           status_source=None if ctx.alone else lambda: client.request("status"))
        if ctx.listener is not None:
            server.bind(ctx.listener)  # the master's socket: it outlives this child
        else:
            _bind_retrying(server, runtime)
    except (OSError, PulseError) as exc:
        return boot_failed(runtime, _bind_failure(ctx.config.api.listen, exc), exc)
    # The event loop shares the interpreter lock with the handler threads
    # (arrays of jobs, the console's reads): a thread back from a round trip
    # waits up to the switch interval for the lock, 5 ms by default (when
    # the enqueue group was a thread, a group of 12 jobs took 8 ms, not 1.5).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    server.start()
    runtime.slot.update(state=ChildState.IDLE)
    runtime.title_detail = f"api {server.url}"
    # The API is on by default: say where, and how to try it (SPEC §7).
    log.info("HTTP API listening on %s (POST /jobs, GET /healthz, /metrics, the status page "
             "at /; [api] enabled = false turns it off)", server.url)
    try:
        while not runtime.should_stop():
            time.sleep(LOOP_SLEEP_S)
    finally:
        server.stop()
    return exit_code_for(runtime)


def _bind_failure(listen: str, exc: BaseException) -> str:
    what = f"listening on api.listen {listen!r}"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        what += " (the port is taken: choose another api.listen, or set [api] enabled = false)"
    return what


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
