"""Repeated kill -9 of a whole pulsed (os.killpg: master and children at
once) every few seconds under steady load. Two daemons take turns as the
victim; a victim stays down for one period (longer than lease_ttl, so the
survivor's leader reaps its expired leases) and comes back with the same
node id just before the other one is killed. No job is lost, none is
stuck, and the jobs a killed node held are finished within a bounded time
(reported as the recovery time)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.chaos.harness import (Feeder, account, accounting_fields, check_accounting,
                                 completion_gaps, now_utc, query, settle)
from tests.pg import wait_until
from tests.system.daemon import pid_alive

pytestmark = pytest.mark.timeout(240)

LEASE_TTL = 3
KILL_EVERY_S = 4.0
FEED_PER_S = 6  # one node alone keeps up (8/s): no backlog hides the recovery
JOB_S = 0.25  # long enough that each kill strands a job or two
WORKERS = 2


def running_on(dsn: str, node: str) -> list[int]:
    rows = query(dsn, "SELECT id FROM pulse_jobs WHERE state = 'running' "
                      "AND starts_with(lease_owner, %s)", (f"{node}/",))
    return [r[0] for r in rows or []]


def restart(daemon_factory, name: str, turn: int, config: dict) -> object:
    """The killed node again (same node id, fresh directory), ready."""
    daemon = daemon_factory(f"{name}{turn}", node_id=f"node-{name}", workers=WORKERS,
                            config=config).start()
    daemon.wait_ready()
    return daemon


@pytest.mark.parametrize("seconds", [15, pytest.param(60, marks=pytest.mark.slow, id="long")])
def test_repeated_kill_9_of_a_whole_daemon(daemon_factory, dsn, marks, record, seconds):
    config = {"worker": {"lease_ttl": LEASE_TTL}}
    nodes = {}
    for name in ("a", "b"):
        nodes[name] = daemon_factory(name, workers=WORKERS, config=config).start()
    for daemon in nodes.values():
        daemon.wait_ready()
    feeder = Feeder(dsn, FEED_PER_S, s=JOB_S, dir=str(marks))
    feeder.start()
    time.sleep(2)

    kills: list[tuple[str, float, list[int]]] = []  # node, when (epoch), jobs it held
    fault_start = now_utc()
    deadline = time.monotonic() + seconds
    turn, down = 0, None
    while time.monotonic() < deadline:
        if down is not None:  # the last victim comes back before the other goes
            nodes[down] = restart(daemon_factory, down, turn, config)
        name = "ab"[turn % 2]
        victim = nodes[name]
        os.killpg(victim.pid, signal.SIGKILL)
        killed_at = time.time()
        victim.wait_exit(timeout=10)
        held = running_on(dsn, f"node-{name}")  # stranded: their leases name a dead node
        kills.append((name, killed_at, held))
        turn, down = turn + 1, name
        time.sleep(KILL_EVERY_S)  # longer than the lease TTL: the survivor reaps
    fault_end = now_utc()
    nodes[down] = restart(daemon_factory, down, turn, config)
    time.sleep(1)
    ids = feeder.stop()

    took = settle(dsn, ids, timeout=60 + LEASE_TTL)
    acc = account(dsn, ids, marks)
    recoveries = []
    for _name, killed_at, held in kills:
        if not held:
            continue
        rows = query(dsn, "SELECT max(finished_at) FROM pulse_jobs WHERE id = ANY(%s) "
                          "AND state = 'completed'", (held,))
        if rows and rows[0][0] is not None:
            recoveries.append(rows[0][0].timestamp() - killed_at)
    record(fault=f"kill -9 of a whole pulsed every {KILL_EVERY_S:g}s for {seconds}s "
                 f"({len(kills)} kills, 2 daemons)",
           load=f"{FEED_PER_S} jobs/s x {JOB_S * 1000:g} ms, 2 x {WORKERS} workers, "
                f"lease_ttl {LEASE_TTL}s",
           recovery_s=max(recoveries) if recoveries else None,
           recovery_mean_s=round(sum(recoveries) / len(recoveries), 3) if recoveries else None,
           jobs_held_by_killed=sum(len(h) for _, _, h in kills),
           longest_gap_s=round(completion_gaps(dsn, ids, fault_start, fault_end), 3),
           settle_s=round(took, 3), **accounting_fields(acc))

    check_accounting(acc, "after repeated kill -9")
    # A cycle is the period plus a restart until ready (a second or two).
    assert len(kills) >= seconds // (KILL_EVERY_S + 2), f"only {len(kills)} kills"
    assert recoveries, "no kill caught a job running: the load is too light to show anything"
    assert max(recoveries) < LEASE_TTL + 10, f"held jobs took {max(recoveries):.1f}s to finish"
    for daemon in nodes.values():
        assert pid_alive(daemon.pid), f"a restarted daemon died; log:\n{daemon.log_tail()}"
    wait_until(lambda: all(len(d.workers()) == WORKERS for d in nodes.values()), timeout=10,
               message="the surviving daemons' workers")
