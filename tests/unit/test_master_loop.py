"""The master's loop (Master.run): what makes it tick.

A tick reads every child's slot of the status board, job table and all, so
it runs on its schedule (TICK_S) or right after a signal or a control
request, never for each chunk of a child's log lines: a busy worker writes
one per batch, and a tick per chunk had the master spend a quarter of a
core in a drain (bench/README.md, session 16)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from pulsed.config import parse_config
from pulsed.master import loop
from pulsed.master.loop import HANDLED_SIGNALS, Master
from pulsed.status_report import NodeState

LINES = 50


@pytest.fixture
def signal_handlers():
    """Master.run installs its handlers and resets them to the defaults on
    its way out; pytest's own (SIGINT) come back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in HANDLED_SIGNALS}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    signal.set_wakeup_fd(wakeup)


def _master_counting_ticks(monkeypatch: pytest.MonkeyPatch) -> tuple[Master, list[NodeState]]:
    """A master with no children whose tick() only records that it ran (a
    real tick would fork the configured workers); TICK_S is far off, so
    every tick this test sees was caused by an event."""
    monkeypatch.setattr(loop, "TICK_S", 3600.0)
    monkeypatch.setattr(loop, "become_subreaper", lambda: None)  # not for pytest's process
    master = Master(parse_config({"daemon": {"workers": 1}}, env={}), "postgresql:///none")
    master._recovered = True  # nothing to recover: no node, no database
    ticks: list[NodeState] = []
    monkeypatch.setattr(master, "tick", lambda: ticks.append(master.state))
    return master, ticks


def _write_lines_one_read_each(master: Master, write_fd: int) -> None:
    """Write LINES log lines, each only once the master has read the one
    before: LINES separate reads of the pipe, each a selector event."""
    ring = master.log_ring
    for n in range(LINES):
        os.write(write_fd, f"line {n}\n".encode())
        while ring.last_seq < n + 1:
            threading.Event().wait(0.001)


def test_a_childs_log_lines_do_not_make_the_master_tick_but_a_signal_does(
        monkeypatch, signal_handlers):
    master, ticks = _master_counting_ticks(monkeypatch)
    read_fd, write_fd = master.log_ring.pipe()
    child_end = os.dup(write_fd)  # watch() closes write_fd, as it does after a fork
    master.log_ring.watch(master.selector, read_fd, write_fd, "worker", 1)

    def child_then_signals() -> None:
        _write_lines_one_read_each(master, child_end)
        signal.raise_signal(signal.SIGCHLD)  # "the tick reaps": one tick
        while len(ticks) < 2:
            threading.Event().wait(0.001)
        signal.raise_signal(signal.SIGTERM)  # the stop: with no child left, the loop ends

    writer = threading.Thread(target=child_then_signals)
    writer.start()
    try:
        master.run()
    finally:
        writer.join(10)
        os.close(child_end)
        os.close(read_fd)
    lines = [line.text for line in master.log_ring.tail(lines=LINES + 10)]
    assert lines == [f"line {n}" for n in range(LINES)]
    # The first tick, then the SIGCHLD's: none for the LINES reads (the old
    # loop ticked after each: LINES + 2). One more is allowed for a stray
    # SIGCHLD, from a process an earlier test left to exit.
    assert 2 <= len(ticks) <= 3, f"{len(ticks)} ticks for {LINES} log reads and a SIGCHLD"
    assert set(ticks) == {NodeState.RUNNING}


def test_a_flood_of_log_lines_does_not_hold_back_the_scheduled_tick(
        monkeypatch, signal_handlers):
    """A child printing without pause keeps the log pipe always readable;
    the ticks (reaping, heartbeat timeouts, the stop deadline) still come
    on their schedule, and every line is kept."""
    master, ticks = _master_counting_ticks(monkeypatch)
    monkeypatch.setattr(loop, "TICK_S", 0.02)
    read_fd, write_fd = master.log_ring.pipe()
    child_end = os.dup(write_fd)
    master.log_ring.watch(master.selector, read_fd, write_fd, "worker", 1)
    written = [0]

    def flood_until_ticked() -> None:
        line = b"x" * 200 + b"\n"
        deadline = threading.Event()
        timer = threading.Timer(30.0, deadline.set)  # a safety net, not the condition
        timer.start()
        while len(ticks) < 10 and not deadline.is_set():
            os.write(child_end, line * 20)
            written[0] += 20
        timer.cancel()
        signal.raise_signal(signal.SIGTERM)

    flooder = threading.Thread(target=flood_until_ticked)
    flooder.start()
    try:
        master.run()
    finally:
        flooder.join(40)
        os.close(child_end)
        os.close(read_fd)
    assert len(ticks) >= 10, "the log flood held back the master's scheduled ticks"
    assert master.log_ring.last_seq == written[0]  # none lost (run() drains at its end)
