"""When the master calls its node degraded: workers wanted and none up."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from pulsed.board import ChildState
from pulsed.config import parse_config
from pulsed.supervisor import BOOT_GRACE_S, Child, Place, Supervisor


@pytest.fixture
def master() -> Iterator[Supervisor]:
    """A master that never runs its loop: its tables are set by hand."""
    supervisor = Supervisor(parse_config({"daemon": {"workers": 2}}, env={}),
                            "postgresql:///none")
    yield supervisor
    supervisor.selector.close()
    supervisor.board.close()
    os.close(supervisor._signal_r)
    os.close(supervisor._signal_w)


def add_worker(master: Supervisor, index: int, state: ChildState) -> Child:
    slot = master.free_slots.pop()
    master.board.reset(slot, "worker", index)
    master.board.writer(slot).update(pid=1000 + index, state=state)
    child = Child("worker", index, slot, 1000 + index, master.generation, time.monotonic())
    master.children[child.pid] = child
    return child


def test_workers_booting_for_the_first_time_are_not_degraded_yet(master):
    add_worker(master, 1, ChildState.STARTING)
    assert master.degraded() is None
    master.started_at -= BOOT_GRACE_S  # still none up, long after the start
    assert master.degraded() == "no worker up (0 of 2)"


def test_workers_in_boot_failure_backoff_are_degraded_with_the_error(master):
    master.places[("worker", 1)] = Place(restarts=3, failures=3, respawn_at=time.monotonic() + 4,
                                         last_error="importing handlers ['x']: ImportError: x")
    master.places[("worker", 2)] = Place(restarts=3, failures=3, respawn_at=time.monotonic() + 4,
                                         last_error="importing handlers ['x']: ImportError: x")
    reason = master.degraded()
    assert reason == "no worker up (0 of 2); worker 1: importing handlers ['x']: ImportError: x"
    assert master.status()["master"]["degraded"] is True
    assert master.status()["master"]["degraded_reason"] == reason
    assert master._status_line().endswith(f"; degraded: {reason}")


def test_one_live_worker_is_enough(master):
    master.places[("worker", 2)] = Place(failures=5, last_error="boom")
    add_worker(master, 1, ChildState.BUSY)
    assert master.degraded() is None
    assert master.status()["master"] == {**master.status()["master"], "degraded": False,
                                         "degraded_reason": None}


def test_a_stopping_worker_does_not_count_and_no_workers_wanted_is_fine(master):
    add_worker(master, 1, ChildState.IDLE).stopping = True
    master.started_at -= BOOT_GRACE_S
    assert master.degraded() == "no worker up (0 of 2)"
    master.desired_workers = 0
    assert master.degraded() is None
