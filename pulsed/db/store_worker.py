"""The Store's worker side: claims, completions, failures, leases, and
waiting for a job's end."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row

from pulsed import metrics
from pulsed.db.rows import (UNREADABLE_ERROR_CLASS, TOKEN_COLUMN, claim_order, claimed_jobs,
                            claimed_jobs_after, unreadable_message)
from pulsed.db.sql import queries, with_literals
from pulsed.db.store_base import StoreBase
from pulsed.jobs import DEFAULT_MAX_ATTEMPTS, DEFAULT_POISON_AFTER, Job, JobState

log = logging.getLogger(__name__)

# job_complete_and_claim's columns before a claimed job's: lost, woken
COMPLETE_AND_CLAIM_LEAD = 2

# How many sets of claim terms a Store keeps statements for (a worker has
# one; a test's Store may see a few).
MAX_CLAIM_TERMS = 16


async def jobs_ended_among(aconn: psycopg.AsyncConnection[Any], ids: list[int]) -> list[int]:
    """Which of these jobs are finished, or no longer exist."""
    cursor = await aconn.execute(queries()["jobs_ended_among"], {"ids": ids})
    return [row[0] for row in await cursor.fetchall()]


@dataclass(frozen=True)
class TypeLimit:
    """A job type's cluster-wide limits ([types.NAME] concurrency / rate)."""

    type: str
    concurrency: int | None = None
    rate_count: int | None = None
    rate_per_s: float | None = None


class ClaimTerms(NamedTuple):
    """What a worker's claims keep from one to the next: built once (by
    ClaimTerms.of, from Store.claim's arguments of the same names) and
    passed to every complete_and_claim."""
    owner: str
    lease_ttl: float
    aging: float = 0.0
    queues: tuple[str, ...] | None = None
    handled: tuple[str, ...] | None = None
    limits: tuple[TypeLimit, ...] = ()
    default_attempts: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, *, owner: str, lease_ttl: float, queues: Sequence[str] | None = None,
           aging: float = 0.0, limits: Sequence[TypeLimit] = (),
           default_attempts: Mapping[str, int] | None = None,
           handled: Sequence[str] | None = None) -> ClaimTerms:
        """handled: the types the worker has handlers for (None: every
        type); jobs of other types are left waiting. default_attempts: the
        max_attempts of a job enqueued without one, by type."""
        return cls(owner, float(lease_ttl), float(aging), tuple(queues) if queues else None,
                   None if handled is None else tuple(handled), tuple(limits),
                   tuple((default_attempts or {}).items()))


class ClaimTexts:
    """The claim statements for one worker's terms: the parameters its
    claims keep from one to the next (owner, lease TTL, aging, queues,
    handled types, type limits, default attempts), written into the text
    as literals, so a claim sends only its limit and its completions.
    Dumping a dozen parameters, arrays among them, and the server's
    run-time tests of the filters they switch off, were ~90 us of a one-job
    claim's round trip of ~680 (W2's pickup). psycopg prepares each text
    as before: the server plans once with the values known."""

    def __init__(self, terms: ClaimTerms, conn: psycopg.Connection) -> None:
        owner, lease_ttl, aging, queues, handled, limits, default_attempts = terms
        if handled is not None:  # a worker claims only the limited types it handles
            limits = tuple(t for t in limits if t.type in handled)
        self.limits: tuple[TypeLimit, ...] = limits
        # A job's max_attempts left NULL at enqueue is resolved at its claim:
        # its type's default, else DEFAULT_MAX_ATTEMPTS. The limited types get
        # it by name, for pulse_claim_limited (migrations 0002, 0016) has a literal.
        defaults = {**{t.type: DEFAULT_MAX_ATTEMPTS for t in limits}, **dict(default_attempts)}
        values = {"owner": owner, "lease_ttl": float(lease_ttl), "aging": float(aging),
                  "queues": list(queues) if queues else None,
                  "handled": None if handled is None else list(handled),
                  "limited": [t.type for t in limits], **_limit_columns(limits),
                  "attempts_by_type": json.dumps(defaults),
                  "default_types": list(defaults),  # pulse_claim_limited's form
                  "default_attempts": list(defaults.values()),
                  "fallback_attempts": DEFAULT_MAX_ATTEMPTS}
        # What cannot be written in stays a parameter: text the connection's
        # encoding cannot read back (a non-ASCII type name under SQL_ASCII).
        self._literals: dict[str, Any] = {}
        self.params: dict[str, Any] = {}
        for name, value in values.items():
            if _renders(value, conn):
                self._literals[name] = value
            else:
                self.params[name] = value
        self._conn = conn
        self._texts: dict[str, str] = {}

    def text(self, name: str) -> str:
        """The named statement with the terms written in."""
        text = self._texts.get(name)
        if text is None:
            text = self._texts[name] = with_literals(queries()[name], self._literals, self._conn)
        return text


def _renders(value: Any, conn: psycopg.Connection) -> bool:
    """Whether value can be written into a statement sent on conn."""
    try:
        sql.Literal(value).as_string(conn)
    except UnicodeError:
        return False
    return True


class WorkerQueries(StoreBase):
    # -- the worker's side ------------------------------------------------------

    def claim(self, *, owner: str, limit: int, lease_ttl: float,
              queues: Sequence[str] | None = None, aging: float = 0.0,
              limits: Sequence[TypeLimit] = (),
              default_attempts: Mapping[str, int] | None = None,
              handled: Sequence[str] | None = None, by_type: bool = False) -> list[Job]:
        terms = ClaimTerms.of(owner=owner, lease_ttl=lease_ttl, queues=queues, aging=aging,
                              limits=limits, default_attempts=default_attempts, handled=handled)
        return self.complete_and_claim([], terms, limit=limit, by_type=by_type)[1]

    def complete_and_claim(self, done: Sequence[Job], terms: ClaimTerms, *, limit: int,
                           by_type: bool = False, listen: bool | None = None,
                           claim_session: bool = False,
                           results: Sequence[str | None] | None = None
                           ) -> tuple[set[int], list[Job]]:
        """Complete `done`, then claim up to `limit` jobs (and, with type
        limits, up to `limit` more of the limited types), in one transaction:
        in the common case one statement (job_complete_and_claim), else one
        round trip of pipelined statements. The completion runs first: it
        only touches rows this worker leases, and the claims skip locked
        rows, so they cannot deadlock with other workers. listen=True first
        starts listening for wake-ups, committed before the claim begins;
        listen=False stops, with the claim. claim_session: the session has
        CLAIM_SESSION's settings, so the claim needs no statement for them
        (a claim with nothing to complete is then a single statement).
        by_type: walk each handled type's jobs apart (job_claim_by_type),
        for when many jobs of other types come first (terms.handled)."""
        texts = self.claim_texts(terms)
        limits = texts.limits
        params = {**texts.params, "limit": limit} if texts.params else {"limit": limit}
        if listen and not self.conn.autocommit:
            raise ValueError("listen needs an autocommit connection (LISTEN must commit first)")
        claim = "job_claim_by_type" if by_type and terms.handled is not None else "job_claim"
        if (done and claim == "job_claim" and not limits and listen is None and claim_session
                and self.conn.autocommit):
            return self._complete_and_claim_one_statement(done, results, texts, params)
        statements: list[tuple[str, Mapping[str, Any] | None]] = []  # (name, parameters)
        if listen is False:
            statements.append(("wakeups_unlisten", None))
        if not claim_session:
            statements.append(("claim_plan_settings", None))
        if done:
            statements.append(("job_complete_many", _completions(done, results)))
        statements.append((claim, params))
        if limits:
            statements.append(("job_claim_limited", params))
        single = len(statements) == 1
        with self._one_round_trip(listen=bool(listen), single=single):
            # Tuple rows whatever the connection's row_factory: claimed rows
            # become Jobs positionally.
            results = {name: self._cursor(single).execute(texts.text(name), args)
                       for name, args in statements}
        held = {row[0] for row in results["job_complete_many"].fetchall()} if done else set()
        jobs, unreadable = claimed_jobs(results[claim])
        if limits:
            more, more_unreadable = claimed_jobs(results["job_claim_limited"])
            jobs += more
            unreadable += more_unreadable
        if unreadable:
            self._fail_unreadable(unreadable)
        jobs.sort(key=claim_order)
        return held, jobs

    def claim_texts(self, terms: ClaimTerms) -> ClaimTexts:
        """The claim statements for these terms, rendered once per Store
        (one per connection: the worker keeps its Store, and its terms)."""
        last = self.__dict__.get("_last_claim_texts")
        if last is not None and last[0] is terms:  # no hash of the nested tuples per claim
            return last[1]
        cache: dict[ClaimTerms, ClaimTexts] = self.__dict__.setdefault("_claim_texts", {})
        texts = cache.get(terms)
        if texts is None:
            if len(cache) >= MAX_CLAIM_TERMS:
                cache.clear()
            texts = cache[terms] = ClaimTexts(terms, self.conn)
        self._last_claim_texts = (terms, texts)
        return texts

    def _complete_and_claim_one_statement(self, done: Sequence[Job],
                                          results: Sequence[str | None] | None,
                                          texts: ClaimTexts, params: Mapping[str, Any]
                                          ) -> tuple[set[int], list[Job]]:
        """complete_and_claim's common case (completions to write, the plain
        claim, no type limits, no LISTEN change, the claim session's
        settings in force) as one statement, its own transaction: one wait
        on the socket instead of one per pipelined statement."""
        cursor = self._cursor(True).execute(
            texts.text("job_complete_and_claim"), {**params, **_completions(done, results)})
        lead, jobs, unreadable = claimed_jobs_after(cursor, COMPLETE_AND_CLAIM_LEAD)
        if unreadable:
            self._fail_unreadable(unreadable)
        jobs.sort(key=claim_order)
        lost = set(lead[0] or ()) if lead is not None else set()
        return {job.id for job in done} - lost, jobs

    def _cursor(self, reuse: bool) -> psycopg.Cursor[Any]:
        """A tuple-row cursor. reuse: the one this Store keeps for claims
        that are one statement (a pipeline needs a cursor per statement).
        A worker keeps one Store per connection, so its claims reuse one
        cursor and psycopg's adapters cached in it: ~25 us a claim less
        than a new cursor's lookups (the pickup latency of W2)."""
        if not reuse:
            return self.conn.cursor(row_factory=tuple_row)
        cursor: psycopg.Cursor[Any] | None = getattr(self, "_claim_cursor", None)
        if cursor is None or cursor.closed:
            cursor = self._claim_cursor = self.conn.cursor(row_factory=tuple_row)
        return cursor

    def _fail_unreadable(self, rows: Sequence[Sequence[Any]]) -> None:
        """Fail claimed jobs that hold a value Python cannot read: failed
        at once (no retry would read it either), the value named in
        last_error and in an attempt row. Every other job of the claim
        runs. If this write fails, the leases expire and the reaper
        returns the jobs, to be failed by the next claim that gets them."""
        try:
            with self.conn.transaction():
                for row in rows:
                    message = unreadable_message(row)
                    self._rows("job_record_error", {
                        "id": row[0], "token": row[TOKEN_COLUMN], "retry": False,
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
