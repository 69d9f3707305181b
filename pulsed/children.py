"""Life inside a forked child: signals, title, monitor thread, exit codes.

`start_child()` forks; the child resets what it inherited from the master,
runs its role (worker or scheduler) and always leaves through os._exit(),
so the master's atexit hooks and buffered handlers never run twice.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from setproctitle import setproctitle

from pulsed.board import Board, ChildState, SlotWriter
from pulsed.config import Config
from pulsed.logs import set_role
from pulsed.errors import CHILD_BOOT_ERROR, CHILD_PARENT_GONE, CHILD_RECYCLE, EXIT_FAILURE, EXIT_OK

log = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.5
# After the master dies a child finishes its job for at most this long,
# then abandons it to lease recovery (SPEC: children exit within seconds).
PARENT_GONE_GRACE_S = 3.0
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class ChildContext:
    """What a child needs from the master, fixed at fork time."""

    role: str  # "worker" | "scheduler" | "api"
    index: int
    slot: int
    board: Board
    config: Config
    dsn: str
    master_pid: int
    after_fork: Callable[[], None]  # the master's: close what the child must not hold
    listener: socket.socket | None = None  # the api child's copy of the master's socket
    instance: str = ""  # the master start's hold on its node id (pulsed/node.py)
    alone: bool = False  # `pulsed --role`: no master to ask for status or to supervise


class ChildRuntime:
    """Flags and reporting shared by a child's main loop and its monitor."""

    def __init__(self, ctx: ChildContext) -> None:
        self.ctx = ctx
        self.slot: SlotWriter = ctx.board.writer(ctx.slot)
        self.stop_requested = False
        self.recycle_requested = False
        self.parent_gone_at: float | None = None
        self.title_detail = "starting"
        self.current_job: Any = None  # a worker's running job, for the title

    def should_stop(self) -> bool:
        return self.stop_requested or self.recycle_requested or self.parent_gone_at is not None

    def draining(self) -> bool:
        return self.ctx.board.draining

    def title(self) -> str:
        name = f"{self.ctx.role} {self.ctx.index}" if self.ctx.role == "worker" else self.ctx.role
        job = self.current_job  # one read: the main thread may change it
        detail = f"busy {job.type}#{job.id}" if job is not None else self.title_detail
        return f"pulsed: {name} [{detail}]"


def start_child(ctx: ChildContext, main: Callable[[ChildRuntime], int]) -> int:
    """Fork a child running main(runtime); return its pid (in the master)."""
    pid = os.fork()
    if pid:
        return pid
    code = EXIT_FAILURE
    try:
        runtime = prepare_process(ctx)
        code = main(runtime)
    except BaseException:  # noqa: BLE001 - whatever happens, leave through _exit
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    raise AssertionError("unreachable")


def prepare_process(ctx: ChildContext) -> ChildRuntime:
    """Set this process up for its role: in a freshly forked child, or in
    `pulsed --role` (pulsed/standalone.py), where there is no master."""
    signal.set_wakeup_fd(-1)
    ctx.after_fork()
    runtime = ChildRuntime(ctx)
    runtime.slot.update(pid=os.getpid())
    set_role(f"{ctx.role}-{ctx.index}" if ctx.role == "worker" else ctx.role)
    _install_signals(runtime)
    _die_with_parent()
    if os.getppid() != ctx.master_pid:  # the master died before we got here
        os._exit(CHILD_PARENT_GONE)
    random.seed()  # children must not share the master's random sequence
    setproctitle(runtime.title())
    ChildMonitor(runtime).start()
    return runtime


def _install_signals(runtime: ChildRuntime) -> None:
    def graceful(signum: int, frame: object) -> None:
        runtime.stop_requested = True  # only a flag: never raise mid-commit

    def immediate(signum: int, frame: object) -> None:
        os._exit(EXIT_OK)  # the master releases what this child held

    signal.signal(signal.SIGTERM, graceful)
    signal.signal(signal.SIGQUIT, immediate)
    # Ctrl-C reaches the whole process group; the master decides for all.
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU,
                   signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask Linux for `signum` when the parent dies (best effort elsewhere)."""
    _prctl(PR_SET_PDEATHSIG, signum)


def become_subreaper() -> None:
    """The master adopts the orphans of its children (a handler's forked
    child whose worker died) instead of init, so it can end them."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def _prctl(option: int, value: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def end_descendants_with_worker() -> None:
    """In a worker: every process a handler forks is killed when the
    worker dies, however it dies (kill -9 included). A forked child left
    alive would run Pulse's code with its parent's connection and leases."""
    os.register_at_fork(after_in_child=lambda: _die_with_parent(signal.SIGKILL))


def live_children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (a single-threaded process), from
    /proc; empty where the kernel does not list them."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return [int(child) for child in listing.read().split()]
    except (OSError, ValueError):
        return []


class ChildMonitor(threading.Thread):
    """Heartbeats into the board, refreshes the process title and RSS, and
    notices the master's death. A thread, because the main thread may be
    inside a long handler; if the process is truly hung (GIL held), the
    heartbeat stops and the master replaces it, as it should."""

    def __init__(self, runtime: ChildRuntime) -> None:
        super().__init__(name="pulse-child-monitor", daemon=True)
        self.runtime = runtime
        self.max_rss = runtime.ctx.config.worker.max_rss_mb * 1024 * 1024

    def run(self) -> None:
        runtime = self.runtime
        last_title = ""
        while True:
            rss = current_rss()
            runtime.slot.update(heartbeat=time.monotonic(), rss_bytes=rss)
            if self.max_rss and rss > self.max_rss and not runtime.recycle_requested:
                log.info("worker %d: RSS %d MiB over max_rss_mb; recycling after this job",
                         runtime.ctx.index, rss // 2**20)
                runtime.recycle_requested = True
            self._check_parent()
            title = runtime.title()
            if title != last_title:
                setproctitle(title)
                last_title = title
            time.sleep(MONITOR_INTERVAL_S)

    def _check_parent(self) -> None:
        runtime = self.runtime
        if os.getppid() == runtime.ctx.master_pid:
            return
        now = time.monotonic()
        if runtime.parent_gone_at is None:
            runtime.parent_gone_at = now
            log.warning("%s %d: the master is gone; stopping", runtime.ctx.role, runtime.ctx.index)
        elif now - runtime.parent_gone_at > PARENT_GONE_GRACE_S:
            os._exit(CHILD_PARENT_GONE)


def current_rss(pid: int | None = None) -> int:
    """This process's resident memory in bytes (or `pid`'s); 0 if unknown."""
    try:
        with open(f"/proc/{pid or 'self'}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def import_handlers(modules: Sequence[str], path: Sequence[str] = ()) -> None:
    """Import the configured handler modules (their decorators register),
    with the directories of `path` (config.import_path) searched first."""
    sys.path[:0] = [entry for entry in path if entry not in sys.path]
    for name in modules:
        importlib.import_module(name)


def boot_failed(runtime: ChildRuntime, what: str, exc: BaseException) -> int:
    """Report why this child cannot start, for the master's status."""
    message = f"{what}: {type(exc).__name__}: {exc}"
    log.error("%s %d cannot start: %s", runtime.ctx.role, runtime.ctx.index, message)
    runtime.slot.update(state=ChildState.BOOT_FAILED, message=message)
    return CHILD_BOOT_ERROR


def exit_code_for(runtime: ChildRuntime) -> int:
    if runtime.parent_gone_at is not None:
        return CHILD_PARENT_GONE
    if runtime.recycle_requested and not runtime.stop_requested:
        return CHILD_RECYCLE
    return EXIT_OK
