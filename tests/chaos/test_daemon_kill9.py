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
from typing import NamedTuple

import pytest

from pulsed.jobs import BACKOFF_BASE_S, BACKOFF_JITTER

from tests.chaos.harness import (Feeder, account, accounting_fields, check_accounting,
                                 completion_gaps, now_utc, query, settle)
from tests.pg import wait_until
from tests.system.daemon import pid_alive

pytestmark = pytest.mark.timeout(240)

LEASE_TTL = 3
LEADER_TTL = 3  # tests/system/daemon.py's scheduler.leader_ttl
KILL_EVERY_S = 4.0
FEED_PER_S = 6  # one node alone keeps up (8/s): no backlog hides the recovery
JOB_S = 0.25  # long enough that each kill strands a job or two
WORKERS = 2


class Recovery(NamedTuple):
    job_id: int
    attempt: int  # the attempt that completed it
    seconds: float  # from the last kill that stranded it to its completion
    bound: float


def recovery_bound(attempt: int) -> float:
    """The longest a stranded job may take, by design, from the kill to its
    completion: its lease expires (LEASE_TTL); the leader that reaps it may
    be the node just killed, or be killed next before it promotes the job,
    so up to two leader leases run out (LEADER_TTL each); the backoff
    before this attempt (BACKOFF_BASE_S doubling, +25% jitter); 2 s for
    the ticks, a restart and the run."""
    backoff = BACKOFF_BASE_S * 2 ** max(0, attempt - 2) * (1 + BACKOFF_JITTER)
    return LEASE_TTL + 2 * LEADER_TTL + backoff + 2.0


def recovery_times(dsn: str, kills: list[tuple[str, float, list[int]]]) -> list[Recovery]:
    """Per stranded job, from the last kill that stranded it: a job that
    was retried onto the next victim and stranded again starts over."""
    last_kill: dict[int, float] = {}
    for _name, killed_at, held in kills:
        last_kill.update(dict.fromkeys(held, killed_at))
    if not last_kill:
        return []
    rows = query(dsn, "SELECT id, attempt, finished_at FROM pulse_jobs WHERE id = ANY(%s) "
                      "AND state = 'completed'", (list(last_kill),))
    return [Recovery(job_id, attempt, round(finished.timestamp() - last_kill[job_id], 3),
                     recovery_bound(attempt))
            for job_id, attempt, finished in rows or []]


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
    recoveries = recovery_times(dsn, kills)
    record(fault=f"kill -9 of a whole pulsed every {KILL_EVERY_S:g}s for {seconds}s "
                 f"({len(kills)} kills, 2 daemons)",
           load=f"{FEED_PER_S} jobs/s x {JOB_S * 1000:g} ms, 2 x {WORKERS} workers, "
                f"lease_ttl {LEASE_TTL}s",
           recovery_s=max(r.seconds for r in recoveries) if recoveries else None,
           recovery_mean_s=(round(sum(r.seconds for r in recoveries) / len(recoveries), 3)
                            if recoveries else None),
           jobs_held_by_killed=sum(len(h) for _, _, h in kills),
           longest_gap_s=round(completion_gaps(dsn, ids, fault_start, fault_end), 3),
           settle_s=round(took, 3), **accounting_fields(acc))

    check_accounting(acc, "after repeated kill -9")
    # A cycle is the period plus a restart until ready (a second or two).
    assert len(kills) >= seconds // (KILL_EVERY_S + 2), f"only {len(kills)} kills"
    assert recoveries, "no kill caught a job running: the load is too light to show anything"
    late = [r for r in recoveries if r.seconds > r.bound]
    assert not late, f"held jobs finished later than the design allows: {late}"
    for daemon in nodes.values():
        assert pid_alive(daemon.pid), f"a restarted daemon died; log:\n{daemon.log_tail()}"
    wait_until(lambda: all(len(d.workers()) == WORKERS for d in nodes.values()), timeout=10,
               message="the surviving daemons' workers")
