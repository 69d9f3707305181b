"""Node commands between nodes (pulsed/node_commands.py) on a real
database: who may be asked, that a request is carried out once, heard by
NOTIFY before the fallback poll, and that an old one expires."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from pulsed.db.store import Store
from pulsed.node_commands import (EXPIRE_S, POLL_S, NodeCommandInbox, NodeRefused, request,
                                  wait_done)
from tests.pg import wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def register(conn: psycopg.Connection, node_id: str, *, master: bool = True,
             age_s: float = 0.0) -> None:
    conn.execute("INSERT INTO pulse_processes (node_id, role, idx, pid, heartbeat_at) "
                 "VALUES (%s, %s, 0, 1, now() - make_interval(secs => %s))",
                 (node_id, "master" if master else "worker", age_s))


@pytest.fixture
def target(dsn: str) -> Iterator[tuple[Store, list[str], Clock, NodeCommandInbox]]:
    """Node B's scheduler end, on its own connection: the commands it was
    asked to carry out, its clock and its inbox (listening)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        asked: list[str] = []
        clock = Clock()

        def carry_out(command: str) -> str:
            asked.append(command)
            return {"drain": "draining", "resume": "running"}[command]
        inbox = NodeCommandInbox("node-b", carry_out, clock=clock)
        store = Store(conn)
        inbox.connected(store)
        yield store, asked, clock, inbox


def test_unknown_silent_and_masterless_nodes_are_refused(conn):
    store = Store(conn)
    register(conn, "node-silent", age_s=120)
    register(conn, "node-alone", master=False)
    for node, status, words in (("node-x", 404, "no node"), ("node-silent", 409, "heartbeating"),
                                ("node-alone", 409, "without a master")):
        with pytest.raises(NodeRefused, match=words) as refused:
            request(store, node, "drain", who="ops", here="node-a")
        assert refused.value.status == status
    assert conn.execute("SELECT count(*) FROM pulse_node_commands").fetchone()[0] == 0
    with pytest.raises(ValueError, match="unknown node command"):
        request(store, "node-x", "stop", who="ops", here="node-a")


def test_a_request_is_heard_carried_out_once_and_acknowledged(conn, target):
    store_b, asked, clock, inbox = target
    assert inbox.run_once(store_b) == 0  # the first look (a new connection): nothing yet
    register(conn, "node-b")
    register(conn, "node-c")
    asker = Store(conn)
    other = request(asker, "node-c", "drain", who="ops", here="node-a")
    assert inbox.run_once(store_b) == 0  # another node's NOTIFY: not looked at before the poll
    first = request(asker, "node-b", "drain", who="ops", here="node-a")
    second = request(asker, "node-b", "resume", who="ci", here="node-a")
    # Heard by NOTIFY (delivered asynchronously: waited for), carried out
    # though the fallback poll is not due (the clock stands still).
    wait_until(lambda: inbox.run_once(store_b) == 2, timeout=10,
               message="the NOTIFY was never heard")
    assert asked == ["drain", "resume"]
    assert wait_done(asker, first, timeout=0) == {"state": "draining"}
    assert wait_done(asker, second, timeout=0) == {"state": "running"}
    clock.now += POLL_S
    assert inbox.run_once(store_b) == 0 and asked == ["drain", "resume"]  # never twice
    assert wait_done(asker, other, timeout=0) is None  # node-c's is still pending


def test_the_fallback_poll_finds_a_request_whose_notify_was_missed(conn, target):
    store_b, asked, clock, inbox = target
    inbox.run_once(store_b)
    register(conn, "node-b")
    command = request(Store(conn), "node-b", "drain", who="ops", here="node-a")
    for _ in store_b.conn.notifies(timeout=10, stop_after=1):
        pass  # the NOTIFY is lost (as with a reconnect)
    assert inbox.run_once(store_b) == 0
    clock.now += POLL_S
    assert inbox.run_once(store_b) == 1 and asked == ["drain"]
    assert wait_done(Store(conn), command, timeout=0) == {"state": "draining"}


def test_an_old_request_expires_and_a_failure_is_acknowledged_with_its_reason(conn, target):
    store_b, asked, clock, inbox = target
    register(conn, "node-b")
    old = request(Store(conn), "node-b", "drain", who="ops", here="node-a")
    conn.execute("UPDATE pulse_node_commands SET requested_at = now() - make_interval(secs => %s)",
                 (EXPIRE_S + 5,))
    clock.now += POLL_S
    assert inbox.run_once(store_b) == 1 and asked == []
    assert "expired" in wait_done(Store(conn), old, timeout=0)["error"]

    def refuse(command: str) -> str:
        raise OSError("control socket gone")
    inbox.carry_out = refuse
    failed = request(Store(conn), "node-b", "resume", who="ops", here="node-a")
    clock.now += POLL_S
    assert inbox.run_once(store_b) == 1
    assert wait_done(Store(conn), failed, timeout=0) == {
        "error": "the master did not resume: control socket gone"}
