"""The leases of dead workers, given back by the master.

When a worker dies its master knows at once (SIGCHLD), long before the
lease would expire: it releases what the worker held, from the worker's
board table. The database may be unreachable just then, so releases queue
up here and are retried every second; lease expiry (the leader's reaper)
stays the fallback. The master holds no connection: each attempt opens a
short-lived one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import psycopg

from pulsed import metrics
from pulsed.db.store import Store
from pulsed.jobs import Outcome
from pulsed.master.table import RSS_HARD_LIMIT_FACTOR, Child, KillReason, describe_exit
from pulsed.node import pulsed_alive, worker_owner

log = logging.getLogger(__name__)

RELEASE_RETRY_S = 1.0
UNSTARTED = "unstarted"  # a release that gives back jobs a dead worker never started
ERROR_CLASSES = {Outcome.TIMEOUT.value: "JobTimeout", Outcome.WORKER_DIED.value: "WorkerDied",
                 Outcome.INTERRUPTED.value: "Interrupted"}


def owner_alive(owner: str) -> bool:
    """Is the worker a lease owner name names (.../worker-N/PID) alive?"""
    try:
        pid = int(owner.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return False
    return pulsed_alive(pid, "pulsed: worker")


NEVER_POISON = 2**31 - 1  # a poison_after no streak reaches


@dataclass(frozen=True)
class Release:
    owners: tuple[str, ...]
    outcome: str  # an attempt outcome, or UNSTARTED
    message: str
    job_ids: tuple[int, ...] | None  # None: every job the owners run
    # False: this death may not be this job's doing (others ran beside it),
    # so it does not make the job poison (worker.poison_after)
    may_poison: bool = True


class LeaseReleases:
    def __init__(self, connect: Callable[[], ContextManager[Any]], poison_after: int) -> None:
        self.connect = connect
        self.poison_after = poison_after
        self.pending: list[Release] = []
        self.next_try = 0.0
        # The previous master's workers still alive at start (their lease
        # owner names): released as each one goes.
        self.previous_workers: set[str] = set()

    def add(self, release: Release, now: float) -> None:
        self.pending.append(release)
        self.retry(now, force=True)

    def retry(self, now: float, force: bool = False) -> None:
        if not self.pending or (now < self.next_try and not force):
            return
        try:
            with self.connect() as conn:
                store = Store(conn)
                while self.pending:
                    self._perform(store, self.pending[0])
                    self.pending.pop(0)
        except psycopg.Error as exc:
            log.warning("could not release leases yet (%s); lease expiry is the fallback", exc)
            self.next_try = now + RELEASE_RETRY_S

    def _perform(self, store: Store, release: Release) -> None:
        owners = list(release.owners)
        if release.outcome == UNSTARTED:
            released = store.give_back_owner(owners, started=list(release.job_ids or ()))
        else:
            released = store.release_owners(
                owners, outcome=release.outcome, message=release.message,
                error_class=ERROR_CLASSES.get(release.outcome, release.outcome),
                job_ids=None if release.job_ids is None else list(release.job_ids),
                poison_after=self.poison_after if release.may_poison else NEVER_POISON)
        metrics.leases_released(released, release.outcome)
        if released:
            log.warning("released %d job(s) of %s (%s): %s", len(released), ", ".join(owners),
                        release.outcome, [r["id"] for r in released])
            store.notify(sorted({r["queue"] for r in released}))

    def previous_incarnation(self, node_id: str, store: Store | None = None) -> None:
        """Leases a previous master of this node left (it was killed): those
        of its workers that are gone are released; the ones still finishing
        their job are watched (previous_workers_gone). On `store` (pulsed's
        start connection: no connection of its own on the way to the first
        fork), else on a connection of its own."""
        try:
            if store is not None:
                alive = recover_previous_incarnation(store, node_id)
            else:
                with self.connect() as conn:
                    alive = recover_previous_incarnation(Store(conn), node_id)
        except psycopg.Error as exc:
            log.warning("could not recover leases of a previous run: %s", exc)
            return
        self.previous_workers = alive

    def previous_workers_gone(self, now: float) -> None:
        """A previous master's worker that was still finishing its job at
        start has left (it stops within seconds of its master's death):
        what it still held is released now, not at lease expiry."""
        gone = tuple(owner for owner in self.previous_workers if not owner_alive(owner))
        if gone:
            self.previous_workers.difference_update(gone)
            self.add(Release(gone, Outcome.WORKER_DIED.value,
                             "the previous pulsed on this node died while the job ran; its "
                             "worker left without finishing it", None,
                             may_poison=False), now)  # its master died: no job is to blame


def recover_previous_incarnation(store: Store, node_id: str) -> set[str]:
    """Release the leases of a previous master's workers that are gone. A
    worker of the dead master may still be finishing its job (it notices
    within seconds and stops): its lease is left to it, and to lease expiry
    if it never writes. Returns those workers' lease owner names."""
    owners = store.owners_running(f"{node_id}/worker-")
    gone = [owner for owner in owners if not owner_alive(owner)]
    alive = set(owners) - set(gone)
    if alive:
        log.warning("left the jobs of %s to them: still running after their master died",
                    ", ".join(sorted(alive)))
    if gone:  # the usual start has none: no statement, no metric import
        released = store.release_owners(
            gone, outcome=Outcome.WORKER_DIED.value,
            message="the previous pulsed on this node died while the job ran",
            # the whole node died, not one job's worker: no job is to blame
            error_class="WorkerDied", poison_after=NEVER_POISON)
        metrics.leases_released(len(released), "previous_master")
        if released:
            log.warning("recovered %d job(s) left running by a previous pulsed: %s",
                        len(released), [r["id"] for r in released])
    return alive


def dead_worker_releases(child: Child, code: int, started: list[int], node_id: str, *,
                         running: list[int] | None = None) -> list[Release]:
    """Account for every job a dead worker held, from its board table (the
    jobs it had started and not yet written): jobs it never started go back
    untouched; a job killed at its timeout gets `timeout`; the other started
    ones get `worker_died` (the attempt counts), or `interrupted` (it does
    not) when the kill was ours for a reason that is not theirs: a sibling's
    timeout, an operator's stop."""
    owners = (worker_owner(node_id, child.index, child.pid),)
    how = describe_exit(code)
    releases = [Release(owners, UNSTARTED, "never started", tuple(started))]
    timed_out = tuple(job_id for job_id in child.timed_out_jobs if job_id in started)
    if timed_out:
        releases.append(Release(owners, Outcome.TIMEOUT.value,
                                f"job ran past its timeout; worker {child.index} {how}", timed_out))
    if interrupted_by_us(child, code):
        why = ("a job beside it ran past its timeout" if child.kill_reason is KillReason.TIMEOUT
               else "the worker was stopped past its stop timeout")
        releases.append(Release(owners, Outcome.INTERRUPTED.value,
                                f"interrupted: {why}; worker {child.index} (pid {child.pid}) {how}",
                                None))
    else:
        # One job ran: the death is its doing, its streak counts. Several: any
        # of them may have done it; as the culprit ran beside the same jobs
        # again after the same backoff, an innocent one was failed as poison.
        # They still use an attempt each (max_attempts bounds the culprit).
        # Only those running count: a finished job whose completion was not
        # written yet (a batch's earlier ones, at concurrency 1) did nothing.
        ran = started if running is None else running
        alone = len([job_id for job_id in ran if job_id not in timed_out]) <= 1
        releases.append(Release(owners, Outcome.WORKER_DIED.value, _died_message(child, how),
                                None, may_poison=alone))
    return releases


def interrupted_by_us(child: Child, code: int) -> bool:
    """Did the master end this worker for a reason that is not its jobs'
    fault (a sibling's timeout, a stop or recycle past its timeout)?"""
    if child.kill_reason in (KillReason.TIMEOUT, KillReason.STOP):
        return True
    # A fast stop's SIGQUIT ends a child with status 0. A SIGKILL without a
    # kill_reason is not ours (every kill of the master's sets one): the
    # operator or the OOM killer ended a leaving worker, a death like any other.
    return child.leaving and child.kill_reason is not KillReason.HEARTBEAT and code == 0


def _died_message(child: Child, how: str) -> str:
    message = f"worker {child.index} (pid {child.pid}) {how}"
    if child.kill_reason is KillReason.RSS:
        return (f"{message}: killed by the master at RSS {child.rss_killed // 2**20} MiB, over "
                f"{RSS_HARD_LIMIT_FACTOR:g} x worker.max_rss_mb")
    return message
