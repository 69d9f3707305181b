"""The only code that executes SQL. Queries come from queries.sql by name.

A Store wraps one psycopg connection it does not own: the application's
(enqueue inside its transaction) or a worker's. Driver errors leave as
StoreError subclasses, except where the caller's own transaction is
involved: there psycopg errors pass through so the application sees them.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, Iterable, Mapping, Sequence

import psycopg
from psycopg.adapt import Transformer
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row, tuple_row
from psycopg.types.json import Jsonb

from pulsed import metrics
from pulsed.jobs import (DEFAULT_POISON_AFTER, Attempt, Job, JobRecord, JobState, Unreadable,
                         backoff_params)

log = logging.getLogger(__name__)

_QUERY_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)

# Which leader lease fences maintenance writes.
LEADER_NAME = "scheduler"

# Session settings for the daemon's background readers (the scheduler's
# status snapshot, the API and /metrics). PostgreSQL shares the host's cores
# with the workers: a status count that goes parallel (three backends) or
# JIT-compiles (~100 ms) takes them from the jobs; one backend, no JIT.
BACKGROUND_SESSION = "-c max_parallel_workers_per_gather=0 -c jit=off"

# Session settings for the scheduler's connection: BACKGROUND_SESSION, and
# bounds on how long a transaction, a lock wait and a statement may last. A
# leader frozen inside a transaction (SIGSTOP, a paused VM) right after a
# cron tick's claim kept the lease row share-locked, and the follower's
# election waited 45 s behind it while no job was promoted and no lease
# reaped. The server now ends such a session after
# SCHEDULER_IDLE_IN_TRANSACTION (its transaction rolls back, its locks go):
# maintenance transactions are a few statements back to back, so only a
# stalled process stays idle in one that long. A statement waits at most
# SCHEDULER_LOCK_TIMEOUT for a lock and runs at most
# SCHEDULER_STATEMENT_TIMEOUT (a batch of the pruner or the reaper takes
# well under a second); either one cancelled is tried again next round.
SCHEDULER_IDLE_IN_TRANSACTION = "2s"
SCHEDULER_LOCK_TIMEOUT = "1s"
SCHEDULER_STATEMENT_TIMEOUT = "10s"
SCHEDULER_SESSION = (f"{BACKGROUND_SESSION}"
                     f" -c idle_in_transaction_session_timeout={SCHEDULER_IDLE_IN_TRANSACTION}"
                     f" -c lock_timeout={SCHEDULER_LOCK_TIMEOUT}"
                     f" -c statement_timeout={SCHEDULER_STATEMENT_TIMEOUT}")

# A worker's handled types are kept this long before its node's registry
# lists the worker (its scheduler heartbeats every few seconds).
WORKER_TYPES_GRACE_S = 60.0
# A worker whose node's registry heartbeat is this recent counts as live
# (the scheduler's NODE_ALIVE_S).
WORKER_ALIVE_S = 30.0
# Jobs that wait for a worker: due now, or later, or after a retry's backoff.
WAITING_STATES = ("available", "scheduled", "retryable")

# Session settings for a worker's connection: claim_plan_settings (see
# queries.sql) for the whole session, so a claim needs no statement of its
# own for them. Nothing else a worker runs on that connection wants a
# sequential scan or a sort: completions, give-backs and failures go by
# primary key.
CLAIM_SESSION = "-c enable_seqscan=off -c enable_sort=off -c jit=off"


def session_options(dsn: str, settings: str) -> str:
    """`options` for connect(): settings after those the DSN (or PGOPTIONS)
    already gives, which passing options= would otherwise replace (a
    search_path set there, say)."""
    given = conninfo_to_dict(dsn).get("options") or os.environ.get("PGOPTIONS", "")
    return f"{given} {settings}".strip()


@functools.cache
def queries() -> dict[str, str]:
    """Every named query in queries.sql."""
    text = (resources.files("pulsed.db") / "queries.sql").read_text()
    parts = _QUERY_HEADER.split(text)[1:]
    return {name: body.strip() for name, body in zip(parts[::2], parts[1::2])}


# enqueue_many's arrays: statement parameter, job_params() key
_BULK_COLUMNS = (("types", "type"), ("queues", "queue"), ("payloads", "payload"),
                 ("priorities", "priority"), ("max_attempts", "max_attempts"),
                 ("run_ats", "run_at"), ("delays", "delay"),
                 ("idempotency_keys", "idempotency_key"), ("timeouts", "timeout"),
                 ("unique_whiles", "unique_while"), ("unique_fors", "unique_for"))
_ON_CONFLICT = re.compile(r"ON CONFLICT \(idempotency_key\).*?DO NOTHING", re.DOTALL)
# Holders met after a conflict whose unique_for period ended are released
# and their keys inserted again; past this many rounds (each round another
# enqueue took the key first, and its hold ended too) something is wrong.
MAX_KEY_ROUNDS = 10


@functools.cache
def _bulk_insert_sql(keyed: bool) -> str:
    """job_insert_many; without its ON CONFLICT clause for a batch with no
    idempotency key, which cannot conflict. The clause makes every row a
    speculative insertion, ~7% of a 1,000-job insert's server time."""
    sql = queries()["job_insert_many"]
    if not _ON_CONFLICT.search(sql):
        raise RuntimeError("queries.sql: job_insert_many lost its ON CONFLICT clause")
    return sql if keyed else _ON_CONFLICT.sub("", sql)


def _record(row: Mapping[str, Any], attempts: Sequence[Attempt] | None = None) -> JobRecord:
    return JobRecord(
        id=row["id"], type=row["type"], queue=row["queue"], state=JobState(row["state"]),
        priority=row["priority"], attempt=row["attempt"], max_attempts=row["max_attempts"],
        payload=row["payload"], run_at=row["run_at"], created_at=row["created_at"],
        started_at=row["started_at"], finished_at=row["finished_at"],
        idempotency_key=row["idempotency_key"], last_error=row["last_error"],
        lease_owner=row["lease_owner"], result=row.get("result"), progress=row.get("progress"),
        unique_while=row.get("unique_while"), unique_until=row.get("unique_until"),
        key_released_at=row.get("key_released_at"),
        attempts=tuple(attempts) if attempts is not None else None,
    )


# What job_claim and job_claim_limited return, in Job's field order: a
# claimed row becomes a Job positionally (a dict per row, then a Job from
# it, cost ~3 us a job; this ~1.7).
_CLAIMED_COLUMNS = ["id", "type", "queue", "payload", "priority", "attempt", "max_attempts",
                    "idempotency_key", "created_at", "run_at", "timeout_s", "lease_token"]


_TOKEN_COLUMN = _CLAIMED_COLUMNS.index("lease_token")
# What a type loader raises on a stored value Python cannot represent: a
# timestamp outside years 1..9999 or infinite (DataError), a JSON number
# past Python's digit limit (ValueError), an overflowing conversion.
_UNREADABLE = (psycopg.DataError, ValueError, OverflowError)
UNREADABLE_ERROR_CLASS = "UnreadableValue"  # the attempt row of a job failed for one


def _claimed_jobs(cursor: psycopg.Cursor[Any]) -> tuple[list[Job], list[tuple[Any, ...]]]:
    """The claimed rows as Jobs, and apart, the rows holding a value Python
    cannot read (the claim committed them as running: they must be failed,
    not left to crash the worker, as year 1 BC in run_at once did)."""
    columns = [column.name for column in cursor.description or ()]
    if columns != _CLAIMED_COLUMNS:
        raise RuntimeError(f"a claim returned columns {columns}, expected {_CLAIMED_COLUMNS}")
    try:
        return [Job(*row) for row in cursor.fetchall()], []
    except _UNREADABLE:
        rows = _load_value_by_value(cursor)
    unreadable = [row for row in rows if _has_unreadable(row)]
    return [Job(*row) for row in rows if not _has_unreadable(row)], unreadable


def _fetch_tolerant(cursor: psycopg.Cursor[Any]) -> list[Any]:
    """Every row of the result; a value that cannot be loaded becomes an
    Unreadable (its PostgreSQL text) instead of failing the whole fetch, so
    listing and showing jobs still show such a job."""
    try:
        return cursor.fetchall()
    except _UNREADABLE:
        return _load_value_by_value(cursor)


def _load_value_by_value(cursor: psycopg.Cursor[Any]) -> list[Any]:
    """The rows not fetched yet, loading each value alone (the slow path,
    taken only when fetchall() failed on some value)."""
    result = cursor.pgresult
    if result is None:
        return []
    transformer = Transformer.from_context(cursor)
    names = [column.name for column in cursor.description or ()]
    loaders = [transformer.get_loader(result.ftype(i), result.fformat(i))
               for i in range(result.nfields)]
    make_row = cursor.row_factory(cursor)
    rows = []
    for index in range(cursor.rownumber or 0, result.ntuples):
        rows.append(make_row([_load_value(loader, result.get_value(index, i), name)
                              for i, (loader, name) in enumerate(zip(loaders, names))]))
    return rows


def _load_value(loader: Any, raw: bytes | None, column: str) -> Any:
    if raw is None:
        return None
    try:
        return loader.load(raw)
    except _UNREADABLE as exc:
        return Unreadable(bytes(raw).decode("utf-8", "replace"), column=column, reason=str(exc))


def _has_unreadable(row: Sequence[Any]) -> bool:
    return any(isinstance(value, Unreadable) for value in row)


def _unreadable_message(row: Sequence[Any]) -> str:
    problems = "; ".join(v.describe() for v in row if isinstance(v, Unreadable))
    return f"the job holds a value Pulse cannot read, so it cannot run: {problems}"


def _claim_order(job: Job) -> tuple[Any, ...]:
    return job.priority, job.run_at, job.id


class Store:
    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def _rows(self, name: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(queries()[name], params)
            return cur.fetchall() if cur.description else []

    # -- enqueue (runs in the caller's transaction) ---------------------------

    def insert_job(self, params: Mapping[str, Any]) -> tuple[int, bool]:
        """Insert one job; return (id, created). An idempotent repeat returns
        the holder's id and created=False. Not pipelined: psycopg waits
        for the BEGIN it sends first anyway, and entering and leaving
        pipeline mode cost ~9% of the single-row enqueue rate."""
        for _ in range(MAX_KEY_ROUNDS):
            with self.conn.cursor(row_factory=dict_row) as cur:
                cur.execute(queries()["job_insert"], params)
                rows = cur.fetchall()
            if rows:
                return rows[0]["id"], True
            holder = self._rows("job_id_by_idempotency_key", params)
            if holder and not holder[0]["expired"]:
                return holder[0]["id"], False
            if holder:  # its unique_for period is over: free the key, insert again
                self._rows("job_keys_release", {"ids": [holder[0]["id"]]})
            # else the holder finished or was pruned between statements
        raise RuntimeError(f"idempotency key {params['idempotency_key']!r}: no holder found "
                           f"and no insert succeeded in {MAX_KEY_ROUNDS} rounds")

    def insert_jobs(self, batch: Sequence[Mapping[str, Any]]) -> list[int]:
        """Insert many jobs in one statement; ids in input order."""
        columns: dict[str, list[Any] | None] = {
            column: [job[key] for job in batch] for column, key in _BULK_COLUMNS}
        for column, values in columns.items():
            if all(value is None for value in values):
                # one NULL instead of an array of them: unnest() pads a
                # missing array with NULLs, and psycopg dumps arrays in Python
                columns[column] = None
        keyed = columns["idempotency_keys"] is not None
        with self.conn.cursor() as cur:
            cur.execute(_bulk_insert_sql(keyed), columns)
            rows = cur.fetchall()
        return self._ids_in_input_order(batch, rows)

    def _ids_in_input_order(self, batch: Sequence[Mapping[str, Any]],
                            rows: list[tuple[Any, ...]]) -> list[int]:
        """Map the inserted rows (id, idempotency_key) back to the batch.
        A keyed item gets the id of the row with its key: the one inserted
        now (the first item with that key), else the job already holding
        it. Keyless rows went in in input order, so their ids, sorted,
        belong to the keyless items in order."""
        by_key = {row[1]: row[0] for row in rows if row[1] is not None}
        keyless = sorted(row[0] for row in rows if row[1] is None)
        if len(keyless) != sum(1 for item in batch if item["idempotency_key"] is None):
            raise RuntimeError(f"bulk insert returned {len(keyless)} rows without an "
                               f"idempotency key for a batch of {len(batch)}")
        missing = {item["idempotency_key"] for item in batch} - by_key.keys() - {None}
        if missing:  # held by jobs enqueued before this batch
            holders = self._rows("job_ids_by_idempotency_keys", {"keys": sorted(missing)})
            expired = [holder["id"] for holder in holders if holder["expired"]]
            if expired:  # their unique_for periods are over: free the keys, insert again
                self._rows("job_keys_release", {"ids": expired})
            by_key.update((holder["idempotency_key"], holder["id"])
                          for holder in holders if not holder["expired"])
        unresolved = [item for item in batch
                      if item["idempotency_key"] is not None and item["idempotency_key"] not in by_key]
        if unresolved:  # released now, or the holder finished or was pruned: insert those
            first = {item["idempotency_key"]: item for item in reversed(unresolved)}
            for item, job_id in zip(first.values(), self.insert_jobs(list(first.values()))):
                by_key[item["idempotency_key"]] = job_id
        positions = iter(keyless)
        return [next(positions) if item["idempotency_key"] is None else by_key[item["idempotency_key"]]
                for item in batch]

    def notify(self, queues: Sequence[str]) -> None:
        self.conn.execute(queries()["jobs_notify"], {"queues": list(queues)})

    # -- the worker's side ------------------------------------------------------

    def claim(self, *, owner: str, limit: int, lease_ttl: float,
              queues: Sequence[str] | None = None, aging: float = 0.0,
              limits: Sequence[TypeLimit] = (),
              default_attempts: Mapping[str, int] | None = None,
              handled: Sequence[str] | None = None, by_type: bool = False) -> list[Job]:
        return self.complete_and_claim([], owner=owner, limit=limit, lease_ttl=lease_ttl,
                                       queues=queues, aging=aging, limits=limits,
                                       default_attempts=default_attempts, handled=handled,
                                       by_type=by_type)[1]

    def complete_and_claim(self, done: Sequence[Job], *, owner: str, limit: int,
                           lease_ttl: float, queues: Sequence[str] | None = None,
                           aging: float = 0.0, limits: Sequence[TypeLimit] = (),
                           default_attempts: Mapping[str, int] | None = None,
                           handled: Sequence[str] | None = None, by_type: bool = False,
                           listen: bool | None = None,
                           claim_session: bool = False,
                           results: Sequence[str | None] | None = None
                           ) -> tuple[set[int], list[Job]]:
        """Complete `done`, then claim up to `limit` jobs (and, with type
        limits, up to `limit` more of the limited types), in one transaction
        and one network round trip (pipeline). The completion runs first: it
        only touches rows this worker leases, and the claims skip locked
        rows, so they cannot deadlock with other workers. listen=True first
        starts listening for wake-ups, committed before the claim begins;
        listen=False stops, with the claim. claim_session: the session has
        CLAIM_SESSION's settings, so the claim needs no statement for them
        (a claim with nothing to complete is then a single statement).
        handled: the types this worker has handlers for (None: every type);
        jobs of other types are left waiting. by_type: walk each handled
        type's jobs apart (job_claim_by_type), for when many jobs of other
        types come first."""
        if handled is not None:
            limits = [t for t in limits if t.type in handled]
        params = {"owner": owner, "limit": limit, "lease_ttl": lease_ttl, "aging": aging,
                  "queues": list(queues) if queues else None,
                  "handled": None if handled is None else list(handled),
                  "limited": [t.type for t in limits], **_limit_columns(limits),
                  "default_types": list(default_attempts or {}),
                  "default_attempts": list((default_attempts or {}).values())}
        if listen and not self.conn.autocommit:
            raise ValueError("listen needs an autocommit connection (LISTEN must commit first)")
        statements: list[tuple[str, Mapping[str, Any] | None]] = []
        if listen is False:
            statements.append(("wakeups_unlisten", None))
        if not claim_session:
            statements.append(("claim_plan_settings", None))
        if done:
            statements.append(("job_complete_many", _completions(done, results)))
        claim = "job_claim_by_type" if by_type and handled is not None else "job_claim"
        statements.append((claim, params))
        if limits:
            statements.append(("job_claim_limited", params))
        with self._one_round_trip(listen=bool(listen), single=len(statements) == 1):
            # Tuple rows whatever the connection's row_factory: claimed rows
            # become Jobs positionally.
            results = {name: self.conn.cursor(row_factory=tuple_row).execute(queries()[name], args)
                       for name, args in statements}
        held = {row[0] for row in results["job_complete_many"].fetchall()} if done else set()
        jobs, unreadable = _claimed_jobs(results[claim])
        if limits:
            more, more_unreadable = _claimed_jobs(results["job_claim_limited"])
            jobs += more
            unreadable += more_unreadable
        if unreadable:
            self._fail_unreadable(unreadable)
        jobs.sort(key=_claim_order)
        return held, jobs

    def _fail_unreadable(self, rows: Sequence[Sequence[Any]]) -> None:
        """Fail claimed jobs that hold a value Python cannot read: failed
        at once (no retry would read it either), the value named in
        last_error and in an attempt row. Every other job of the claim
        runs. If this write fails, the leases expire and the reaper
        returns the jobs, to be failed by the next claim that gets them."""
        try:
            with self.conn.transaction():
                for row in rows:
                    message = _unreadable_message(row)
                    self._rows("job_record_error", {
                        "id": row[0], "token": row[_TOKEN_COLUMN], "retry": False,
                        "backoff": 0.0, "outcome": "error",
                        "error_class": UNREADABLE_ERROR_CLASS, "message": message,
                        "traceback": None, "poison_after": DEFAULT_POISON_AFTER,
                        "poison_note": poison_note(DEFAULT_POISON_AFTER)})
                    log.error("job %s#%s failed: %s", row[1], row[0], message)
        except psycopg.Error as exc:
            log.warning("could not fail %d job(s) holding unreadable values (%s); "
                        "their leases will expire", len(rows), exc)

    @contextmanager
    def _one_round_trip(self, *, listen: bool = False, single: bool = False) -> Iterator[None]:
        """Run the block's statements as one transaction in one round trip.
        In autocommit mode: a pipeline whose transaction is BEGIN … COMMIT
        statements, since psycopg's transaction() inside a pipeline waits
        for its BEGIN and again for its COMMIT (strace: four round trips a
        claim). The COMMIT is queued only after the block ran: if Python
        raises in the middle, psycopg still ends the pipeline with a Sync,
        which would commit an implicit transaction's queued statements; an
        explicit one stays open and is rolled back here. A single statement
        (single=True) runs alone, its own transaction. listen=True first
        commits a LISTEN in the same round trip, so it is in force before
        the block's snapshot: a job committed after that snapshot sends a
        wake-up this connection hears. Not in autocommit mode psycopg owns
        BEGIN: the block runs in one psycopg transaction."""
        if not self.conn.autocommit:
            with self.conn.pipeline(), self.conn.transaction():
                yield
            return
        if single and not listen:
            yield
            return
        try:
            with self.conn.pipeline():
                if listen:
                    with self._explicit_transaction():
                        self.conn.execute(queries()["wakeups_listen"])
                with self._explicit_transaction():
                    yield
        except BaseException:
            if not self.conn.closed and self.conn.info.transaction_status != TransactionStatus.IDLE:
                try:
                    self.conn.execute("ROLLBACK")
                except psycopg.Error:
                    pass  # the connection is gone: so is the transaction
            raise

    @contextmanager
    def _explicit_transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN")
        yield
        self.conn.execute("COMMIT")

    def listen_for_wakeups(self) -> None:
        self.conn.execute(queries()["wakeups_listen"])

    def types_waiting(self) -> list[str]:
        """The types of available jobs."""
        return [row[0] for row in self.conn.execute(queries()["job_types_waiting"])]

    def types_with_available_jobs(self, types: Sequence[str]) -> list[str]:
        rows = self.conn.execute(queries()["types_with_available_jobs"], {"types": list(types)})
        return [row[0] for row in rows]

    def give_back(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """Un-claim jobs that were never started; the ones given back."""
        if not jobs:
            return []
        return self._rows("job_give_back", {
            "ids": [j.id for j in jobs], "tokens": [j.lease_token for j in jobs]})

    def complete(self, jobs: Iterable[Job],
                 results: Sequence[str | None] | None = None) -> set[int]:
        """Mark jobs completed, each with its result (JSON text or None);
        return the ids whose lease still held."""
        rows = self._rows("job_complete_many", _completions(list(jobs), results))
        return {r["id"] for r in rows}

    def write_progress(self, jobs: Sequence[Job], reports: Sequence[str]) -> set[int]:
        """Running jobs' progress (JSON text each), fenced; the ids still held."""
        rows = self._rows("job_progress_many", {
            "ids": [j.id for j in jobs], "tokens": [j.lease_token for j in jobs],
            "progress": list(reports)})
        return {r["id"] for r in rows}

    def listen_for_cancels(self) -> None:
        self.conn.execute(queries()["cancels_listen"])

    def cancelled_among(self, job_ids: Sequence[int]) -> list[int]:
        """Which of these jobs are cancelled (a worker that cannot LISTEN polls)."""
        return [row[0] for row in self.conn.execute(queries()["jobs_cancelled_among"],
                                                    {"ids": list(job_ids)}).fetchall()]

    # -- waiting for a job's end ----------------------------------------------------

    def waiter_add(self, job_id: int) -> int | None:
        """Ask for a NOTIFY pulse_done when the job ends; None: no such job."""
        rows = self._rows("job_waiter_add", {"job_id": job_id})
        return rows[0]["id"] if rows else None

    def waiter_remove(self, waiter_id: int) -> None:
        self.conn.execute(queries()["job_waiter_remove"], {"id": waiter_id})

    def listen_for_ends(self, listen: bool = True) -> None:
        self.conn.execute(queries()["jobs_done_listen" if listen else "jobs_done_unlisten"])

    def record_error(self, job: Job, *, retry: bool, backoff: float, outcome: str,
                     error_class: str | None, message: str | None,
                     traceback: str | None,
                     poison_after: int = DEFAULT_POISON_AFTER) -> JobState | None:
        """End an attempt that failed; the job's new state, None if the
        lease was lost."""
        rows = self._rows("job_record_error", {
            "id": job.id, "token": job.lease_token, "retry": retry, "backoff": backoff,
            "outcome": outcome, "error_class": error_class, "message": message or "",
            "traceback": traceback, "poison_after": poison_after,
            "poison_note": poison_note(poison_after),
        })
        if rows and rows[0]["poisoned"]:
            metrics.jobs_poisoned(1)
        return JobState(rows[0]["state"]) if rows else None

    def snooze(self, job: Job, delay: float) -> JobState | None:
        rows = self._rows("job_snooze", {"id": job.id, "token": job.lease_token, "delay": delay})
        return JobState(rows[0]["state"]) if rows else None

    def renew_leases(self, jobs: Iterable[Job], lease_ttl: float) -> set[int]:
        jobs = list(jobs)
        rows = self._rows("job_renew_leases", {
            "ids": [j.id for j in jobs], "tokens": [j.lease_token for j in jobs],
            "lease_ttl": lease_ttl})
        return {r["id"] for r in rows}

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

    # -- operators ----------------------------------------------------------------

    def cancel(self, job_id: int) -> bool:
        return bool(self._rows("job_cancel", {"id": job_id}))

    def retry(self, job_id: int) -> bool:
        rows = self._rows("job_retry", {"id": job_id})
        if rows:
            self.notify([rows[0]["queue"]])
        return bool(rows)

    def _shown_rows(self, name: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """_rows() for what operators look at: a value Python cannot read
        is shown as PostgreSQL's text of it (an Unreadable), not an error."""
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(queries()[name], params)
            return _fetch_tolerant(cur) if cur.description else []

    def get_job(self, job_id: int, *, with_attempts: bool = True) -> JobRecord | None:
        rows = self._shown_rows("job_get", {"id": job_id})
        if not rows:
            return None
        attempts = None
        if with_attempts:
            attempts = [Attempt(**r) for r in self._shown_rows("job_attempts", {"id": job_id})]
            attempts += _completed_attempt(rows[0])
        return _record(rows[0], attempts)

    def list_jobs(self, *, state: str | None = None, type: str | None = None,
                  after: int | None = None, limit: int = 50) -> list[JobRecord]:
        rows = self._shown_rows("job_list", {"state": state, "type": type, "after": after,
                                             "limit": limit})
        return [_record(r) for r in rows]

    def queue_depths(self) -> list[dict[str, Any]]:
        """Per type and state: count (queue_ages without the ages; the same
        index reads, so one query serves both)."""
        return [{"type": r["type"], "state": r["state"], "count": r["count"]}
                for r in self.queue_ages()]

    def running_progress(self, node_id: str, limit: int = 1000) -> dict[str, Any]:
        """Progress reports of the jobs running on a node, by job id (text)."""
        rows = self._rows("jobs_running_progress", {"owner_prefix": f"{node_id}/",
                                                    "limit": limit})
        return {str(r["id"]): r["progress"] for r in rows}

    def queue_ages(self) -> list[dict[str, Any]]:
        """Per type and state: count, and oldest_age_s (see queries.sql)."""
        return self._rows("queue_ages", {})

    def oldest_available_age(self) -> float | None:
        row = self.conn.execute(queries()["oldest_available_age"]).fetchone()
        return row[0] if row else None


@dataclass(frozen=True)
class TypeLimit:
    """A job type's cluster-wide limits ([types.NAME] concurrency / rate)."""

    type: str
    concurrency: int | None = None
    rate_count: int | None = None
    rate_per_s: float | None = None


def _completions(jobs: Sequence[Job], results: Sequence[str | None] | None
                 ) -> dict[str, Any]:
    """job_complete_many's arrays. Results all None go as one NULL, which
    unnest() pads: no array of NULLs built per batch on the fast path."""
    if results is not None and all(result is None for result in results):
        results = None
    return {"ids": [j.id for j in jobs], "tokens": [j.lease_token for j in jobs],
            "results": list(results) if results is not None else None}


def poison_note(poison_after: int) -> str:
    """What a poisoned job's last_error adds to its last attempt's error."""
    return (f"poison job: {poison_after} attempts in a row ended worker_died or timeout, "
            "so it is failed without another try (pulsectl retry ID runs it again)")


def _limit_columns(limits: Sequence[TypeLimit]) -> dict[str, list[Any]]:
    return {"types": [t.type for t in limits],
            "concurrency": [t.concurrency for t in limits],
            "rate_count": [t.rate_count for t in limits],
            "rate_per": [t.rate_per_s for t in limits]}


def _fence(leader_id: str | None, term: int | None) -> dict[str, Any]:
    """The parameters of a leader-fenced write (term None: unfenced)."""
    return {"leader_name": LEADER_NAME, "leader_id": leader_id, "term": term}


def _completed_attempt(row: Mapping[str, Any]) -> list[Attempt]:
    """A completed job's final attempt lives in the job row itself."""
    if row["state"] != JobState.COMPLETED.value:
        return []
    return [Attempt(attempt=row["attempt"], worker=row["lease_owner"],
                    started_at=row["started_at"], finished_at=row["finished_at"],
                    outcome="completed")]
