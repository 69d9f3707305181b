"""The connection budget: status shows the database's connections in use,
Pulse's among them, against the server's limit; the leader warns before
they run out."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from pulsed.scheduler import SchedulerLoop
from tests.pg import wait_until

pytestmark = pytest.mark.timeout(60)


def test_status_counts_pulse_s_connections_against_the_limit(daemon_factory, conn):
    daemon = daemon_factory(workers=2).start()
    daemon.wait_ready()

    def usage():
        return daemon.status().get("connections")

    found = wait_until(lambda: (usage() or {}).get("pulse", 0) >= 3, timeout=20,
                       message=lambda: f"no connection count in status: {daemon.status()}")
    found = usage()
    limit = conn.execute("SELECT current_setting('max_connections')::int - "
                         "current_setting('superuser_reserved_connections')::int").fetchone()[0]
    assert found["available"] == limit
    assert found["total"] >= found["pulse"] + 1  # this test's own connection too


class FakeStore:
    def __init__(self, total: int) -> None:
        self.usage = {"pulse": 10, "total": total, "available": 100}

    def connection_usage(self) -> dict[str, int]:
        return self.usage


def leader_loop() -> SchedulerLoop:
    loop = SchedulerLoop.__new__(SchedulerLoop)  # only what _connections reads
    loop.leadership = SimpleNamespace(is_leader=True)
    loop.due = {}
    return loop


def test_the_leader_warns_at_80_percent_once_a_minute(caplog):
    loop = leader_loop()
    with caplog.at_level(logging.WARNING, logger="pulsed.scheduler"):
        assert loop._connections(FakeStore(total=79))["total"] == 79
        assert not caplog.records
        loop._connections(FakeStore(total=80))
        loop._connections(FakeStore(total=95))
    assert len(caplog.records) == 1
    assert "80 of its 100 connections in use (10 of them Pulse's)" in caplog.text
