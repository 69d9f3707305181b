"""The Store's enqueue statements; they run in the caller's transaction."""

from __future__ import annotations

import functools
import re
from collections.abc import Generator, Iterable
from typing import Any, Mapping, NamedTuple, Sequence

import psycopg
from psycopg.rows import dict_row, tuple_row

from pulsed.db.rows import fetch_tolerant, fetch_tolerant_async, has_columns, job_record
from pulsed.db.sql import queries
from pulsed.db.store_base import StoreBase
from pulsed.jobs import JobRecord

# enqueue_many's arrays: statement parameter, job_params() key
_BULK_COLUMNS = (("types", "type"), ("queues", "queue"), ("payloads", "payload"),
                 ("priorities", "priority"), ("max_attempts", "max_attempts"),
                 ("run_ats", "run_at"), ("delays", "delay"),
                 ("idempotency_keys", "idempotency_key"), ("timeouts", "timeout"),
                 ("unique_whiles", "unique_while"), ("unique_fors", "unique_for"),
                 ("trace_contexts", "trace_context"))
_ON_CONFLICT = re.compile(r"ON CONFLICT \(idempotency_key\).*?DO NOTHING", re.DOTALL)
# Holders met after a conflict whose unique_for period ended are released
# and their keys inserted again; past this many rounds (each round another
# enqueue took the key first, and its hold ended too) something is wrong.
MAX_KEY_ROUNDS = 10
_RESULT = "(SELECT count(*) FROM woken) AS woken"  # job_insert_many's last result column


@functools.cache
def _bulk_insert_sql(keyed: bool, answer: bool = False) -> str:
    """job_insert_many; without its ON CONFLICT clause for a batch with no
    idempotency key, which cannot conflict. The clause makes every row a
    speculative insertion, ~7% of a 1,000-job insert's server time. With
    `answer`, each row also brings back INSERTED_COLUMNS."""
    sql = queries()["job_insert_many"]
    if not _ON_CONFLICT.search(sql):
        raise RuntimeError("queries.sql: job_insert_many lost its ON CONFLICT clause")
    if answer:
        if _RESULT not in sql:
            raise RuntimeError(f"queries.sql: job_insert_many lost {_RESULT!r}")
        sql = sql.replace(_RESULT, _RESULT + ", " + ", ".join(INSERTED_COLUMNS))
    return sql if keyed else _ON_CONFLICT.sub("", sql)


# -- enqueue's statements, for a sync or an async connection ------------------
# Enqueue runs on the application's connection, which may be a psycopg
# Connection or an AsyncConnection. Its statements and the decisions between
# them (a held idempotency key, a holder whose unique_for period is over) are
# written once, as generators that yield each Statement and are sent its
# rows back; run_steps and run_steps_async only execute them.


class Statement(NamedTuple):  # a NamedTuple: built per enqueue, cheaper than a dataclass
    sql: str
    params: Mapping[str, Any]
    dict_rows: bool = False  # rows as dicts (else tuples)
    tolerant: bool = False  # a value Python cannot read becomes an Unreadable (rows.py)


Steps = Generator[Statement, list[Any], Any]


def run_steps(conn: psycopg.Connection, steps: Steps) -> Any:
    """Execute the steps' statements on a sync connection; their result."""
    rows: list[Any] | None = None
    while True:
        try:
            statement = steps.send(rows)  # type: ignore[arg-type]  # None starts it
        except StopIteration as done:
            return done.value
        # psycopg.Cursor, not conn.cursor(): the application's cursor_factory
        # (a RawCursor takes $1 placeholders, not these %(name)s ones) is
        # for its own statements.
        with psycopg.Cursor(conn, row_factory=dict_row if statement.dict_rows
                            else tuple_row) as cur:
            cur.execute(statement.sql, statement.params)
            # In pipeline mode (the application's `with conn.pipeline():`)
            # the result arrives only when fetched: pgresult is None until
            # fetchall(), which must not be read as "no rows".
            if cur.pgresult is not None and not has_columns(cur):
                rows = []
            else:
                rows = fetch_tolerant(cur) if statement.tolerant else cur.fetchall()


async def run_steps_async(aconn: psycopg.AsyncConnection, steps: Steps) -> Any:
    """run_steps on an AsyncConnection: the same statements, awaited."""
    rows: list[Any] | None = None
    while True:
        try:
            statement = steps.send(rows)  # type: ignore[arg-type]
        except StopIteration as done:
            return done.value
        async with psycopg.AsyncCursor(  # as in run_steps
                aconn, row_factory=dict_row if statement.dict_rows else tuple_row) as cur:
            await cur.execute(statement.sql, statement.params)
            if cur.pgresult is not None and not has_columns(cur):  # as in run_steps
                rows = []
            elif statement.tolerant:
                rows = await fetch_tolerant_async(cur)
            else:
                rows = await cur.fetchall()


def insert_job_steps(params: Mapping[str, Any]) -> Generator[Statement, list[Any], tuple[int, bool]]:
    """Insert one job: (id, created). An idempotent repeat gives the
    holder's id and created=False. Not pipelined: psycopg waits for the
    BEGIN it sends first anyway, and entering and leaving pipeline mode
    cost ~9% of the single-row enqueue rate."""
    for _ in range(MAX_KEY_ROUNDS):
        # tuple rows: dict rows cost ~30 us more of a one-job enqueue's
        # ~430 us of client CPU on a cold cache (W2's latency starts here)
        rows = yield Statement(queries()["job_insert"], params)  # id, state, woken
        if rows:
            return rows[0][0], True
        holder = yield Statement(queries()["job_id_by_idempotency_key"], params)  # id, expired
        if holder and not holder[0][1]:
            return holder[0][0], False
        if holder:  # its unique_for period is over: free the key, insert again
            yield Statement(queries()["job_keys_release"], {"ids": [holder[0][0]]})
        # else the holder finished or was pruned between statements
    raise RuntimeError(f"idempotency key {params['idempotency_key']!r}: no holder found "
                       f"and no insert succeeded in {MAX_KEY_ROUNDS} rounds")


class Inserted(NamedTuple):
    """One item of a bulk insert: its job's id and state, and whether this
    batch created it (False: the job already holding its idempotency key,
    or an earlier item of the batch with the same key)."""
    id: int
    state: str
    created: bool
    # created, when asked for: the columns the database set (INSERTED_COLUMNS)
    columns: Mapping[str, Any] | None = None


# what inserted_jobs(answer=True) adds after (id, idempotency_key, state, woken)
INSERTED_COLUMNS = ("priority", "max_attempts", "run_at", "created_at", "unique_until")


def insert_jobs_steps(batch: Sequence[Mapping[str, Any]]
                      ) -> Generator[Statement, list[Any], list[int]]:
    """Insert many jobs in one statement: their ids in input order."""
    return [item.id for item in (yield from inserted_jobs_steps(batch))]


def inserted_jobs_steps(batch: Sequence[Mapping[str, Any]], answer: bool = False
                        ) -> Generator[Statement, list[Any], list[Inserted]]:
    """insert_jobs_steps, with each item's state and whether it was created
    (and with `answer`, a created item's INSERTED_COLUMNS)."""
    columns: dict[str, list[Any] | None] = {
        column: [job[key] for job in batch] for column, key in _BULK_COLUMNS}
    for column, values in columns.items():
        if all(value is None for value in values):
            # one NULL instead of an array of them: unnest() pads a
            # missing array with NULLs, and psycopg dumps arrays in Python
            columns[column] = None
    keyed = columns["idempotency_keys"] is not None
    rows = yield Statement(_bulk_insert_sql(keyed, answer), columns)
    return (yield from _in_input_order(batch, rows, answer))


def answered_jobs_steps(batch: Sequence[Mapping[str, Any]]) -> Generator[
        Statement, list[Any], tuple[list[Inserted], dict[int, JobRecord]]]:
    """inserted_jobs_steps with `answer`, and the rows of the jobs that
    already held an item's idempotency key (by id): what the HTTP API
    answers each item with. Run it in one transaction, so the holders read
    are the ones the insert met."""
    inserted = yield from inserted_jobs_steps(batch, answer=True)
    held_ids = sorted({item.id for item in inserted if item.columns is None})
    if not held_ids:
        return inserted, {}
    rows = yield Statement(queries()["jobs_get_by_ids"], {"ids": held_ids}, dict_rows=True,
                           tolerant=True)
    return inserted, {row["id"]: job_record(row) for row in rows}


def _in_input_order(batch: Sequence[Mapping[str, Any]], rows: list[tuple[Any, ...]],
                    answer: bool) -> Generator[Statement, list[Any], list[Inserted]]:
    """Map the inserted rows (id, idempotency_key, state) back to the batch.
    A keyed item gets the row with its key: the one inserted now (created
    for the first item with that key), else the job already holding it.
    Keyless rows went in in input order, so their ids, sorted, belong to
    the keyless items in order."""
    by_key = {row[1]: (row[0], row[2], _columns(row)) for row in rows if row[1] is not None}
    keyless = sorted((row[0], row[2], _columns(row)) for row in rows if row[1] is None)
    if len(keyless) != sum(1 for item in batch if item["idempotency_key"] is None):
        raise RuntimeError(f"bulk insert returned {len(keyless)} rows without an "
                           f"idempotency key for a batch of {len(batch)}")
    created_keys = set(by_key)
    missing = {item["idempotency_key"] for item in batch} - by_key.keys() - {None}
    if missing:  # held by jobs enqueued before this batch
        holders = yield Statement(queries()["job_ids_by_idempotency_keys"],
                                  {"keys": sorted(missing)}, dict_rows=True)
        expired = [holder["id"] for holder in holders if holder["expired"]]
        if expired:  # their unique_for periods are over: free the keys, insert again
            yield Statement(queries()["job_keys_release"], {"ids": expired})
        by_key.update((holder["idempotency_key"], (holder["id"], holder["state"], None))
                      for holder in holders if not holder["expired"])
    unresolved = [item for item in batch
                  if item["idempotency_key"] is not None and item["idempotency_key"] not in by_key]
    if unresolved:  # released now, or the holder finished or was pruned: insert those
        first = {item["idempotency_key"]: item for item in reversed(unresolved)}
        again = yield from inserted_jobs_steps(list(first.values()), answer)
        for item, done in zip(first.values(), again):
            by_key[item["idempotency_key"]] = (done.id, done.state, done.columns)
            if done.created:
                created_keys.add(item["idempotency_key"])
    positions = iter(keyless)
    out: list[Inserted] = []
    for item in batch:
        key = item["idempotency_key"]
        if key is None:
            job_id, state, columns = next(positions)
            out.append(Inserted(job_id, state, True, columns))
        else:
            job_id, state, columns = by_key[key]
            created = key in created_keys
            out.append(Inserted(job_id, state, created, columns if created else None))
            created_keys.discard(key)  # a later item with the same key got this job
    return out


def _columns(row: tuple[Any, ...]) -> dict[str, Any] | None:
    return dict(zip(INSERTED_COLUMNS, row[4:])) if len(row) > 4 else None


class EnqueueQueries(StoreBase):
    # -- enqueue (runs in the caller's transaction) ---------------------------

    def insert_job(self, params: Mapping[str, Any]) -> tuple[int, bool]:
        """Insert one job; return (id, created). See insert_job_steps."""
        return run_steps(self.conn, insert_job_steps(params))

    def insert_jobs(self, batch: Sequence[Mapping[str, Any]]) -> list[int]:
        """Insert many jobs in one statement; ids in input order."""
        return run_steps(self.conn, insert_jobs_steps(batch))

    def inserted_jobs(self, batch: Sequence[Mapping[str, Any]], *,
                      answer: bool = False) -> list[Inserted]:
        """insert_jobs, with each item's state and whether it was created
        (and with `answer`, what the database set: Inserted.columns)."""
        return run_steps(self.conn, inserted_jobs_steps(batch, answer))

    def inserted_keyless_chunks(self, chunks: Iterable[Sequence[Mapping[str, Any]]]
                                ) -> list[Inserted]:
        """inserted_jobs of jobs without idempotency keys, one statement per
        chunk, each sent as soon as `chunks` yields it (pipeline mode): the
        server inserts a chunk while the caller checks the next (a 1,000-job
        POST /jobs took 25 ms, 16 in chunks of 200). In the caller's
        transaction, which must be open: if `chunks` raises, what was sent
        is left to its rollback. The first problem in input order is what
        raises: a chunk the database refused before `chunks` raised on a
        later one (its error is known only once the pipeline ends)."""
        sent: list[tuple[Steps, psycopg.Cursor[Any]]] = []
        failed: Exception | None = None
        with self.conn.pipeline():
            iterator = iter(chunks)
            while True:
                try:
                    chunk = next(iterator)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - raised below, after the pipeline
                    # ended cleanly: psycopg would log the database's error
                    # as "ignored", and it is the earlier problem
                    failed = exc
                    break
                if any(params["idempotency_key"] is not None for params in chunk):
                    raise ValueError("inserted_keyless_chunks: a job has an idempotency key")
                steps = inserted_jobs_steps(chunk)
                statement = next(steps)
                cursor = self.conn.cursor(row_factory=tuple_row)
                cursor.execute(statement.sql, statement.params)
                sent.append((steps, cursor))
        if failed is not None:
            raise failed
        inserted: list[Inserted] = []
        for steps, cursor in sent:
            try:
                steps.send(cursor.fetchall())
            except StopIteration as done:
                inserted += done.value
            else:  # a keyless chunk needs no second statement
                raise RuntimeError("inserted_keyless_chunks: a chunk asked for more statements")
        return inserted
