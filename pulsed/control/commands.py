"""The control commands: what each does with the master (the target),
including a drain --wait, whose reply goes out from the server's tick once
no job runs. A mix-in of ControlServer (pulsed/control/server.py), which
owns the connections."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import pulsed
from pulsed.control import protocol
from pulsed.control.protocol import (INTERNAL, SHUTTING_DOWN, TIMEOUT, ControlError, Request,
                                     error_reply, ok_reply)
from pulsed.status_report import StatusReport

if TYPE_CHECKING:
    from pulsed.control.server import ControlServer, _Connection

log = logging.getLogger(__name__)


class ControlTarget(Protocol):
    """What the control commands act on: the Master (a fake in tests).

    Each method returns a dict merged into the reply. Raising ControlError
    sends its code and message; another PulseError (a ConfigError on reload)
    sends ``failed`` with its message; anything else sends ``internal``.
    """

    def status(self) -> StatusReport | Mapping[str, Any]: ...  # SPEC §9 status shape
    def scale(self, workers: int | str) -> Mapping[str, Any]: ...  # {"workers": desired}
    def drain(self) -> Mapping[str, Any]: ...  # idempotent; {"state": ...}
    def resume(self) -> Mapping[str, Any]: ...
    def reload(self) -> Mapping[str, Any]: ...
    def stop(self, now: bool) -> Mapping[str, Any]: ...
    def restart(self, role: str, index: int) -> Mapping[str, Any]: ...  # {role, index, pid}
    def logs(self, role: str | None, index: int | None, lines: int,
             after: int | None) -> Mapping[str, Any]: ...  # {"lines": [...], "last_seq"}
    def running_jobs(self) -> int: ...  # jobs running on this node
    def is_stopping(self) -> bool: ...  # True: write commands get shutting_down


@dataclass
class _Wait:
    """A drain --wait in progress: its reply goes out from tick()."""

    started: float
    timeout: float | None
    result: Mapping[str, Any]


class ControlCommands:
    def command_handlers(self: ControlServer) -> dict[str, Any]:
        handlers = {
            "hello": self._hello, "status": self._status,  # read commands
            "scale": self._scale, "drain": self._drain, "resume": self._resume,  # write commands
            "reload": self._reload, "stop": self._stop, "restart": self._restart,
            "logs": self._logs,
        }
        assert set(handlers) == set(protocol.COMMANDS)
        return handlers

    def _dispatch(self: ControlServer, conn: _Connection, request: Request) -> dict[str, Any] | None:
        # `stop --now` is the one write a stop leaves open: like SIGQUIT (or
        # a second Ctrl-C), it turns a graceful stop that waits on a long
        # job into a fast one.
        escalates = request.cmd == "stop" and request.args.get("now")
        if request.command.writes and not escalates and self.target.is_stopping():
            raise ControlError(SHUTTING_DOWN, f"pulsed is stopping; {request.cmd} is refused")
        if request.command.writes and self._hung_up(conn):
            # Its client gave up waiting (pulsectl: exit 3, "no reply") and
            # told its operator nothing happened: a master that was frozen
            # (SIGSTOP, a debugger, swap) must not then carry out every
            # request queued meanwhile in one burst (scale +1 five times).
            log.warning("control socket: %s of pid %d not carried out: its client hung up "
                        "before pulsed read it", request.cmd, conn.peer.pid)
            return None  # nobody to answer
        result = self._handlers[request.cmd](conn, **request.args)
        return None if result is None else ok_reply(result)

    def _hello(self: ControlServer, conn: _Connection) -> Mapping[str, Any]:
        return {"protocol": protocol.PROTOCOL_VERSION, "version": pulsed.__version__,
                "commands": list(protocol.COMMANDS)}

    def _status(self: ControlServer, conn: _Connection) -> Mapping[str, Any]:
        report = self.target.status()
        return _checked(report.to_json() if isinstance(report, StatusReport) else report)

    def _scale(self: ControlServer, conn: _Connection, workers: int | str) -> Mapping[str, Any]:
        return _checked(self.target.scale(workers))

    def _drain(self: ControlServer, conn: _Connection, wait: bool, timeout: float | None
               ) -> Mapping[str, Any] | None:
        result = _checked(self.target.drain())
        if not wait:
            return result
        conn.wait = _Wait(self._clock(), timeout, result)
        self._finish_wait(conn, conn.wait.started)  # replies now if nothing runs
        return None

    def _resume(self: ControlServer, conn: _Connection) -> Mapping[str, Any]:
        return _checked(self.target.resume())

    def _reload(self: ControlServer, conn: _Connection) -> Mapping[str, Any]:
        return _checked(self.target.reload())

    def _stop(self: ControlServer, conn: _Connection, now: bool) -> Mapping[str, Any]:
        return _checked(self.target.stop(now))

    def _restart(self: ControlServer, conn: _Connection, role: str, index: int) -> Mapping[str, Any]:
        return _checked(self.target.restart(role, index))

    def _logs(self: ControlServer, conn: _Connection, role: str | None, index: int | None, lines: int,
              after: int | None) -> Mapping[str, Any]:
        return _checked(self.target.logs(role, index, lines, after))

    def _finish_wait(self: ControlServer, conn: _Connection, now: float) -> bool:
        """Reply to a drain --wait if no job runs any more, or its time is up."""
        wait = conn.wait
        assert wait is not None
        try:
            running = self.target.running_jobs()
        except Exception:
            log.exception("control socket: running_jobs() failed")
            conn.wait = None
            self._send(conn, error_reply(INTERNAL, "cannot count running jobs; see pulsed's log"))
            return True
        waited = now - wait.started
        if running == 0:
            reply = ok_reply({**wait.result, "running_jobs": 0, "waited_s": round(waited, 3)})
        elif wait.timeout is not None and waited >= wait.timeout:
            reply = error_reply(TIMEOUT, f"{running} job(s) still running on this node after "
                                         f"{wait.timeout:g}s; pulsed stays draining "
                                         "(`pulsectl resume` undoes it)")
        else:
            return False
        conn.wait = None
        self._send(conn, reply)
        return True


def _checked(result: Any) -> Mapping[str, Any]:
    if not isinstance(result, Mapping):
        raise TypeError(f"the control target returned {type(result).__name__}, not a dict")
    return result


