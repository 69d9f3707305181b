"""The Store's enqueue statements; they run in the caller's transaction."""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping, Sequence

from psycopg.rows import dict_row

from pulsed.db.sql import queries
from pulsed.db.store_base import StoreBase

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


class EnqueueQueries(StoreBase):
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
