"""The Store's master and leader side: releasing dead workers' leases,
maintenance, paused queues, cron ticks, node ids, the process registry and
leadership."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

from psycopg.types.json import Jsonb

from pulsed import metrics
from pulsed.db.sql import queries
from pulsed.db.store_base import StoreBase
from pulsed.db.store_worker import poison_note
from pulsed.jobs import DEFAULT_POISON_AFTER, backoff_params

# Which leader lease fences maintenance writes.
LEADER_NAME = "scheduler"

# A worker's handled types are kept this long before its node's registry
# lists the worker (its scheduler heartbeats every few seconds).
WORKER_TYPES_GRACE_S = 60.0
# A worker whose node's registry heartbeat is this recent counts as live
# (the scheduler's NODE_ALIVE_S).
WORKER_ALIVE_S = 30.0
# Jobs that wait for a worker: due now, or later, or after a retry's backoff.
WAITING_STATES = ("available", "scheduled", "retryable")


class LeaderQueries(StoreBase):
    # -- the master's and the leader's side ---------------------------------------

    def release_owners(self, owners: Sequence[str], *, outcome: str, message: str,
                       error_class: str | None = None, owner_prefix: str | None = None,
                       keep_owners: Sequence[str] = (),
                       job_ids: Sequence[int] | None = None,
                       poison_after: int = DEFAULT_POISON_AFTER) -> list[dict[str, Any]]:
        """Release the leases of owners that are gone; the jobs released
        (id, state, type, queue, poisoned)."""
        rows = self._rows("job_release_owner", {
            "owners": list(owners), "owner_prefix": owner_prefix,
            "keep_owners": list(keep_owners), "outcome": outcome, "message": message,
            "error_class": error_class,
            "job_ids": list(job_ids) if job_ids is not None else None,
            **backoff_params(poison_after), "poison_note": poison_note(poison_after),
        })
        poisoned = sum(1 for row in rows if row["poisoned"])
        if poisoned:
            metrics.jobs_poisoned(poisoned)
        return rows

    def give_back_owner(self, owners: Sequence[str], *, started: Sequence[int]
                        ) -> list[dict[str, Any]]:
        """Un-claim the jobs of gone owners except those that had started."""
        return self._rows("job_give_back_owner", {"owners": list(owners),
                                                  "started": list(started)})

    def reap_expired(self, *, limit: int = 1000, now: datetime | None = None,
                     leader_id: str | None = None, term: int | None = None
                     ) -> list[dict[str, Any]]:
        """Release expired leases; the jobs reaped (id, state, queue)."""
        return self._rows("job_reap_expired", {
            "limit": limit, "now": now, **_fence(leader_id, term), **backoff_params()})

    def promote_due(self, *, limit: int = 1000, now: datetime | None = None,
                    leader_id: str | None = None, term: int | None = None) -> list[dict[str, Any]]:
        return self._rows("job_promote_due", {
            "limit": limit, "now": now, **_fence(leader_id, term)})

    def prune_finished(self, state: str, retention: float, *, limit: int = 10_000,
                       now: datetime | None = None, leader_id: str | None = None,
                       term: int | None = None) -> int:
        rows = self._rows("job_prune_finished", {
            "state": state, "retention": retention, "limit": limit, "now": now,
            **_fence(leader_id, term)})
        return rows[0]["deleted"]

    def jobs_dead_rows(self) -> tuple[int, int]:
        """(dead, live) row versions of pulse_jobs, from the statistics."""
        row = self.conn.execute(queries()["jobs_dead_rows"]).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    def may_vacuum_jobs(self) -> bool:
        """Does this user own pulse_jobs (or is superuser), so VACUUM works?"""
        row = self.conn.execute(queries()["jobs_may_vacuum"]).fetchone()
        return bool(row and row[0])

    def vacuum_jobs(self, lock_timeout: str) -> None:
        """VACUUM pulse_jobs (an autocommit connection: not in a transaction)."""
        self.conn.execute(f"SET lock_timeout = '{lock_timeout}'")
        self.conn.execute(queries()["jobs_vacuum"])

    # -- queues -----------------------------------------------------------------------

    def pause_queue(self, queue: str) -> None:
        self.conn.execute(queries()["queue_pause"], {"queue": queue})

    def resume_queue(self, queue: str) -> None:
        self.conn.execute(queries()["queue_resume"], {"queue": queue})

    def paused_queues(self) -> list[str]:
        return [r["queue"] for r in self._rows("queues_paused", {})]

    # -- cron -------------------------------------------------------------------------

    def cron_claim_tick(self, name: str, tick: datetime, *, leader_id: str | None,
                        term: int | None) -> bool:
        """Take a cron tick; False if it was taken already or we are deposed.
        Call inside a transaction that also enqueues the tick's job."""
        if term is None:
            raise ValueError("cron ticks are always fenced: pass the leader term")
        return bool(self._rows("cron_tick_claim", {
            "name": name, "tick": tick, **_fence(leader_id, term)}))

    def cron_set_job(self, name: str, tick: datetime, job_id: int) -> None:
        self.conn.execute(queries()["cron_tick_set_job"],
                          {"name": name, "tick": tick, "job_id": job_id})

    def db_now(self) -> datetime:
        """The database's now(): a host's wall clock may be minutes off."""
        return self.conn.execute(queries()["db_now"]).fetchone()[0]

    def cron_last_tick(self, name: str) -> datetime | None:
        row = self.conn.execute(queries()["cron_last_tick"], {"name": name}).fetchone()
        return row[0] if row else None

    def cron_prune_ticks(self, horizon: float, *, leader_id: str, term: int) -> int:
        return self.conn.execute(queries()["cron_ticks_prune"], {
            "horizon": horizon, **_fence(leader_id, term)}).rowcount

    # -- node ids: one running pulsed each -------------------------------------------------

    def node_instance_get(self, node_id: str) -> dict[str, Any] | None:
        """The holder of a node id, locked until the caller's transaction ends."""
        rows = self._rows("node_instance_get", {"node_id": node_id})
        return rows[0] if rows else None

    def node_instance_claim(self, node_id: str, instance: str, host: str,
                            master_pid: int) -> None:
        self._rows("node_instance_claim", {"node_id": node_id, "instance": instance,
                                           "host": host, "master_pid": master_pid})

    def node_instance_heartbeat(self, node_id: str, instance: str) -> bool:
        """False when another start holds the node id now."""
        return bool(self._rows("node_instance_heartbeat",
                               {"node_id": node_id, "instance": instance}))

    def node_instance_release(self, node_id: str, instance: str) -> None:
        self._rows("node_instance_release", {"node_id": node_id, "instance": instance})

    def owners_running(self, owner_prefix: str) -> list[str]:
        return [r["lease_owner"] for r in self._rows("job_owners_running",
                                                     {"owner_prefix": owner_prefix})]

    # -- the process registry ------------------------------------------------------------

    def processes_heartbeat(self, node_id: str, processes: Sequence[Mapping[str, Any]]) -> None:
        """Refresh this node's registry rows and drop rows it no longer has."""
        columns = {
            "node_id": node_id,
            "roles": [p["role"] for p in processes], "idxs": [p["idx"] for p in processes],
            "pids": [p["pid"] for p in processes],
            "infos": [Jsonb(p.get("info", {})) for p in processes],
        }
        with self.conn.transaction():
            self.conn.execute(queries()["process_heartbeat_many"], columns)
            self.conn.execute(queries()["process_forget_others"], columns)
            self.conn.execute(queries()["worker_types_forget_unlisted"],
                              {"grace": WORKER_TYPES_GRACE_S})

    def worker_types_register(self, node_id: str, pid: int, types: Sequence[str]) -> None:
        self.conn.execute(queries()["worker_types_register"],
                          {"node_id": node_id, "pid": pid, "types": list(types)})

    def unhandled_types(self, depths: Iterable[Mapping[str, Any]], *,
                        max_age: float = WORKER_ALIVE_S) -> list[dict[str, Any]]:
        """The types with waiting jobs (from queue_depths() or queue_ages()
        rows) that no live worker handles, with how many jobs wait."""
        handled = {row[0] for row in self.conn.execute(queries()["types_handled_live"],
                                                       {"max_age": max_age})}
        waiting: dict[str, int] = {}
        for row in depths:
            if row["state"] in WAITING_STATES and row["type"] not in handled:
                waiting[row["type"]] = waiting.get(row["type"], 0) + row["count"]
        return [{"type": t, "count": n} for t, n in sorted(waiting.items())]

    def processes_forget_node(self, node_id: str) -> None:
        self.conn.execute(queries()["process_forget_node"], {"node_id": node_id})

    def processes_prune_dead(self, max_age: float, *, leader_id: str | None = None,
                             term: int | None = None) -> list[dict[str, Any]]:
        return self._rows("process_prune_dead", {"max_age": max_age,
                                                 **_fence(leader_id, term)})

    def nodes_alive(self, max_age: float) -> list[dict[str, Any]]:
        return self._rows("nodes_alive", {"max_age": max_age})

    # -- leadership -----------------------------------------------------------------

    def leader_elect(self, leader_id: str, ttl: float) -> int | None:
        rows = self._rows("leader_attempt_elect",
                          {"name": LEADER_NAME, "leader_id": leader_id, "ttl": ttl})
        return rows[0]["term"] if rows else None

    def leader_reelect(self, leader_id: str, term: int, ttl: float) -> bool:
        return bool(self._rows("leader_attempt_reelect", {
            "name": LEADER_NAME, "leader_id": leader_id, "term": term, "ttl": ttl}))

    def leader_resign(self, leader_id: str, term: int) -> None:
        self.conn.execute(queries()["leader_resign"],
                          {"name": LEADER_NAME, "leader_id": leader_id, "term": term})

    def leader_get(self) -> dict[str, Any] | None:
        rows = self._rows("leader_get", {"name": LEADER_NAME})
        return rows[0] if rows else None


def _fence(leader_id: str | None, term: int | None) -> dict[str, Any]:
    """The parameters of a leader-fenced write (term None: unfenced)."""
    return {"leader_name": LEADER_NAME, "leader_id": leader_id, "term": term}
