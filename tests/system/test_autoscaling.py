"""Autoscaling on a real daemon: a load step up adds workers, the end of it
sheds them, and an operator's pin holds until `workers=auto`."""

from __future__ import annotations

import pytest

import pulsed
from pulsed.control.client import ControlClient
from tests.pg import wait_until

pytestmark = pytest.mark.timeout(90)


def test_a_backlog_adds_workers_and_idleness_sheds_them(daemon_factory, conn, marks):
    daemon = daemon_factory(workers="1..3", config={
        "daemon": {"scale_cooldown": "1s", "scale_down_after": "2s"}}).start()
    daemon.wait_ready(workers=1)
    client = ControlClient(daemon.socket_path, timeout=5)
    pulsed.enqueue_many(conn, [{"type": "sleep", "payload": {"s": 0.4, "dir": str(marks)}}
                               for _ in range(40)])

    def desired() -> int:
        return daemon.status()["master"]["workers_desired"]

    wait_until(lambda: desired() == 3, timeout=30,
               message=lambda: f"never scaled up to 3; log:\n{daemon.log_tail()}")
    change = daemon.status()["master"]["autoscale"]["last_change"]
    assert change["to"] > change["from"] and "waiting" in change["reason"], change
    wait_until(lambda: conn.execute("SELECT count(*) FROM pulse_jobs WHERE state <> 'completed'"
                                    ).fetchone()[0] == 0, timeout=40, message="jobs never ran")
    wait_until(lambda: desired() == 1, timeout=30,
               message=lambda: f"never scaled back down; log:\n{daemon.log_tail()}")
    assert "autoscaling from 1 to" in daemon.log_text()

    reply = client.request("scale", workers="2")
    assert reply["workers"] == 2 and reply["autoscale"]["pinned"] == 2
    daemon.wait_ready(workers=2)
    reply = client.request("scale", workers="auto")
    assert reply["autoscale"]["pinned"] is None
    wait_until(lambda: desired() == 1, timeout=20, message="the pin was not lifted")
