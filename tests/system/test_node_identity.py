"""One pulsed per node id, and a restarted master leaves the old workers'
jobs to them (issue 23 items 4 and 7)."""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest

import pulsed
from pulsed.db.store import Store
from pulsed.errors import EXIT_NODE_IN_USE, NodeInUse
from pulsed.node import NODE_STALE_S, claim_node
from tests.chaos.harness import record_result
from tests.pg import wait_until

pytestmark = pytest.mark.timeout(90)


def _owner(conn: psycopg.Connection, job_id: int) -> str | None:
    record = Store(conn).get_job(job_id)
    return record.lease_owner if record.state.value == "running" else None


def test_a_second_daemon_with_the_same_node_id_refuses_to_start(daemon_factory, conn, marks):
    first = daemon_factory("a", node_id="web-1", workers=1).start()
    first.wait_ready()
    job_id = pulsed.enqueue(conn, "sleep", {"s": 60, "dir": str(marks)})
    owner = wait_until(lambda: _owner(conn, job_id), timeout=10, message="the job never started")

    copy = daemon_factory("copy", node_id="web-1", workers=1).start()
    started = time.monotonic()
    assert copy.wait_exit(timeout=20) == EXIT_NODE_IN_USE
    refused_in = time.monotonic() - started
    assert "node id 'web-1' is in use by another pulsed on this host" in copy.log_text()
    # Nothing of the first daemon was touched: its job runs on, same lease.
    assert _owner(conn, job_id) == owner
    assert not Store(conn).get_job(job_id).attempts
    assert first.status()["master"]["state"] == "running"

    # Once the first stops cleanly, the node id is free at once.
    first.signal(signal.SIGQUIT)
    first.wait_exit(timeout=15)
    again = daemon_factory("again", node_id="web-1", workers=1).start()
    again.wait_ready()
    record_result(fault="a second pulsed with the same node_id (a copied config), started "
                        "while the first runs a job", load="1 job of 60 s on the first daemon",
                  lost=0, stuck=0, duplicates=0, recovery_s=None, exit_status=EXIT_NODE_IN_USE,
                  refused_in_s=round(refused_in, 2), first_daemons_job_untouched=True)


def test_a_node_id_held_on_another_host_is_refused_until_its_heartbeat_is_stale(conn):
    claim_node(conn, "web-2", master_pid=1, host="another-machine")
    with pytest.raises(NodeInUse, match="on another host"):
        claim_node(conn, "web-2", master_pid=os.getpid())
    conn.execute("UPDATE pulse_node_instances SET heartbeat_at = now() - make_interval("
                 "secs => %s)", (NODE_STALE_S + 1,))
    claim = claim_node(conn, "web-2", master_pid=os.getpid())
    assert claim.previous is not None and not claim.previous_on_this_host()


def test_an_immediately_restarted_master_leaves_a_running_job_to_its_old_worker(
        daemon_factory, conn, marks):
    daemon = daemon_factory("a", node_id="web-3", workers=1).start()
    daemon.wait_ready()
    job_id = pulsed.enqueue(conn, "sleep", {"s": 2, "dir": str(marks)}, max_attempts=3)
    # Its handler running, not only claimed: a worker whose master died
    # starts nothing more, so a job claimed but not yet started goes back
    # (its attempt undone) and the new master's worker runs it instead
    # (CI once killed the master in that gap).
    wait_until(lambda: list(marks.glob(f"{job_id}.1.*.start")), timeout=10,
               message="the job never started")
    old_worker = next(iter(daemon.workers()))

    daemon.signal(signal.SIGKILL)  # the master alone: its worker runs on
    killed = time.monotonic()
    daemon.wait_exit(timeout=5)
    again = daemon_factory("b", node_id="web-3", workers=1).start()

    store = Store(conn)
    wait_until(lambda: store.get_job(job_id).state.value == "completed", timeout=20,
               message=f"the job did not complete; log:\n{again.log_tail()}")
    record = store.get_job(job_id)
    assert [a.outcome for a in record.attempts] == ["completed"], record.attempts
    assert record.attempt == 1
    done = list(marks.glob(f"{job_id}.*.done"))
    assert [int(p.name.split(".")[2]) for p in done] == [old_worker], "the job ran twice"
    assert "left the jobs of" in again.log_text()
    record_result(fault="kill -9 of the master alone while its worker runs a job; "
                        "a new pulsed started at once on the same node_id",
                  load="1 job of 2 s, 1 worker", lost=0, stuck=0, duplicates=len(done) - 1,
                  recovery_s=None, outcomes=[a.outcome for a in record.attempts],
                  completed_after_kill_s=round(time.monotonic() - killed, 2))


def test_a_job_the_old_worker_abandons_is_released_when_it_leaves(daemon_factory, conn, marks):
    """The old worker of a killed master stops within seconds, abandoning a
    long job: the new master releases it as soon as that worker is gone,
    not a lease TTL (30 s here) later."""
    daemon = daemon_factory("a", node_id="web-4", workers=1).start()
    daemon.wait_ready()
    job_id = pulsed.enqueue(conn, "sleep_first", {"s": 60, "dir": str(marks)})
    # Started, not only claimed (see the test above): an unstarted job goes
    # back untouched, with no worker_died attempt.
    wait_until(lambda: list(marks.glob(f"{job_id}.1.*.start")), timeout=10,
               message="the job never started")

    daemon.signal(signal.SIGKILL)
    daemon.wait_exit(timeout=5)
    killed = time.monotonic()
    again = daemon_factory("b", node_id="web-4", workers=1).start()
    store = Store(conn)
    wait_until(lambda: store.get_job(job_id).state.value == "completed", timeout=20,
               message=f"the abandoned job was not released; log:\n{again.log_tail()}")
    took = time.monotonic() - killed
    record = store.get_job(job_id)
    assert [a.outcome for a in record.attempts] == ["worker_died", "completed"]
    assert "left without finishing it" in (record.attempts[0].error_message or "")
    assert took < 15, f"released {took:.1f}s after the kill: lease expiry, not the master"
    record_result(fault="kill -9 of the master alone while its worker runs a 60 s job; a new "
                        "pulsed at once on the same node_id",
                  load="1 job of 60 s (quick on attempt 2), 1 worker", lost=0, stuck=0,
                  duplicates=0, recovery_s=took, outcomes=[a.outcome for a in record.attempts])
