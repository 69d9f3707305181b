"""When the master calls its node degraded: workers wanted and none up."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pulsed.board import ChildState
from pulsed.config import parse_config
from pulsed.master import Master
from pulsed.master.report import BOOT_GRACE_S, degraded_reason
from pulsed.master.table import Child, Place


@pytest.fixture
def master() -> Iterator[Master]:
    """A master that never runs its loop: its tables are set by hand."""
    master = Master(parse_config({"daemon": {"workers": 2}}, env={}), "postgresql:///none")
    yield master
    master.selector.close()
    master.board.close()
    os.close(master._signal_r)
    os.close(master._signal_w)


def degraded(master: Master) -> str | None:
    return degraded_reason(master.node_view())


def add_worker(master: Master, index: int, state: ChildState) -> Child:
    slot = master.table.take_slot()
    master.board.reset(slot, "worker", index)
    master.board.writer(slot).update(pid=1000 + index, state=state)
    return master.table.add("worker", index, slot, 1000 + index, master.clock())


def test_workers_booting_for_the_first_time_are_not_degraded_yet(master):
    add_worker(master, 1, ChildState.STARTING)
    assert degraded(master) is None
    master.started_at -= BOOT_GRACE_S  # still none up, long after the start
    assert degraded(master) == "no worker up (0 of 2)"


def test_workers_in_boot_failure_backoff_are_degraded_with_the_error(master):
    for index in (1, 2):
        master.table.places[("worker", index)] = Place(
            restarts=3, failures=3, respawn_at=master.clock() + 40,
            last_error="importing handlers ['x']: ImportError: x")
    reason = degraded(master)
    assert reason == "no worker up (0 of 2); worker 1: importing handlers ['x']: ImportError: x"
    status = master.status().to_json()
    assert status["master"]["degraded"] is True
    assert status["master"]["degraded_reason"] == reason
    assert master._status_line().endswith(f"; degraded: {reason}")
    backoff = [c for c in status["children"] if c["state"] == "backoff"]
    assert [c["index"] for c in backoff] == [1, 2]
    assert all(30.0 < c["respawn_in_s"] <= 40.0 for c in backoff)  # a slow machine: room


def test_one_live_worker_is_enough(master):
    master.table.places[("worker", 2)] = Place(failures=5, last_error="boom")
    add_worker(master, 1, ChildState.BUSY)
    assert degraded(master) is None
    status = master.status().to_json()
    assert status["master"]["degraded"] is False
    assert status["master"]["degraded_reason"] is None


def test_a_stopping_worker_does_not_count_and_no_workers_wanted_is_fine(master):
    add_worker(master, 1, ChildState.IDLE).leaving = True
    master.started_at -= BOOT_GRACE_S
    assert degraded(master) == "no worker up (0 of 2)"
    master.desired_workers = 0
    assert degraded(master) is None
