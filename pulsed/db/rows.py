"""Rows into Pulse's objects: job records, claimed Jobs (positionally, the
hot path), and values Python cannot read (shown, or failing their job)."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any, Mapping, Sequence

import psycopg
from psycopg.adapt import Transformer
from psycopg.types.json import set_json_loads

from pulsed.jobs import Attempt, Job, JobRecord, JobState, Unreadable

def job_record(row: Mapping[str, Any], attempts: Sequence[Attempt] | None = None) -> JobRecord:
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
                    "idempotency_key", "created_at", "run_at", "timeout_s", "lease_token",
                    "started_at"]


_CLAIMED_NAMES = [name.encode() for name in _CLAIMED_COLUMNS]
_JOB_FIELDS = tuple(field.name for field in fields(Job))
_new_object = object.__new__
TOKEN_COLUMN = _CLAIMED_COLUMNS.index("lease_token")
# What a type loader raises on a stored value Python cannot represent: a
# timestamp outside years 1..9999 or infinite (DataError), a JSON number
# past Python's digit limit (ValueError), an overflowing conversion.
_UNREADABLE = (psycopg.DataError, ValueError, OverflowError)
UNREADABLE_ERROR_CLASS = "UnreadableValue"  # the attempt row of a job failed for one


def claimed_jobs(cursor: psycopg.Cursor[Any]) -> tuple[list[Job], list[tuple[Any, ...]]]:
    """The claimed rows as Jobs, and apart, the rows holding a value Python
    cannot read (the claim committed them as running: they must be failed,
    not left to crash the worker, as year 1 BC in run_at once did)."""
    return claimed_jobs_after(cursor, 0)[1:]


def claimed_jobs_after(cursor: psycopg.Cursor[Any], skip: int
                       ) -> tuple[tuple[Any, ...] | None, list[Job], list[tuple[Any, ...]]]:
    """claimed_jobs for a result whose rows start with `skip` other columns
    (job_complete_and_claim: lost, woken), the same in every row, and where
    a row whose job columns are all NULL means nothing was claimed: those
    leading columns (None without rows), the Jobs, the unreadable rows."""
    columns = _column_names(cursor)[skip:]
    if columns != _CLAIMED_NAMES:
        raise RuntimeError(f"a claim returned columns {[c.decode() for c in columns]}, "
                           f"expected {_CLAIMED_COLUMNS}")
    try:
        rows, tolerant = cursor.fetchall(), False
    except _UNREADABLE:
        rows, tolerant = _load_value_by_value(cursor), True
    lead = tuple(rows[0][:skip]) if rows else None
    claimed = [row[skip:] for row in rows if row[skip] is not None] if skip else rows
    if not tolerant:  # every value loaded: none is Unreadable
        return lead, [job_from_row(row) for row in claimed], []
    unreadable = [row for row in claimed if _has_unreadable(row)]
    return lead, [job_from_row(row) for row in claimed if not _has_unreadable(row)], unreadable


def job_from_row(row: Sequence[Any]) -> Job:
    """Job(*row), for a row with every one of Job's fields in order, at a
    fifth of the cost: a frozen dataclass's __init__ sets each field
    through object.__setattr__ (1.75 us); this stores them into the new
    object's dict by name, in one unpacking (0.36 us; zip() and update()
    took 0.87). The names are Job's fields, checked below at import."""
    job = _new_object(Job)
    d = job.__dict__
    (d["id"], d["type"], d["queue"], d["payload"], d["priority"], d["attempt"],
     d["max_attempts"], d["idempotency_key"], d["created_at"], d["run_at"], d["timeout"],
     d["lease_token"], d["started_at"]) = row
    return job


if _JOB_FIELDS != ("id", "type", "queue", "payload", "priority", "attempt", "max_attempts",
                   "idempotency_key", "created_at", "run_at", "timeout", "lease_token",
                   "started_at"):
    raise RuntimeError(f"Job's fields changed to {_JOB_FIELDS}: update job_from_row")


_json_decoder = json.JSONDecoder()


def load_json(data: bytes) -> Any:
    """json.loads() for the JSON text PostgreSQL sends, a quarter of its
    cost: jsonb's text is UTF-8 with nothing around the value, so the
    encoding detection and the whitespace scans json.loads() does on
    bytes are skipped. Anything else (json's own text may keep spaces,
    a SQL_ASCII database any bytes) goes to json.loads(), which then
    decides, and raises, as it always did. A worker's claims load each
    job's payload with it (~2 us a job of a drain's ~50; W1)."""
    try:
        text = data.decode()
        value, end = _json_decoder.raw_decode(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return json.loads(data)
    if end != len(text):
        return json.loads(data)
    return value


def use_fast_json(conn: psycopg.Connection[Any]) -> None:
    """Load json and jsonb values on this connection with load_json."""
    set_json_loads(load_json, conn)


def _column_names(cursor: psycopg.Cursor[Any]) -> list[bytes]:
    """The result's column names as the server sent them: read from the
    result itself, not cursor.description (which builds a Column object
    per column, per claim: ~30 us of a one-job pickup)."""
    result = cursor.pgresult
    if result is None:
        return []
    return [result.fname(i) or b"" for i in range(result.nfields)]


def has_columns(cursor: psycopg.Cursor[Any] | psycopg.AsyncCursor[Any]) -> bool:
    """Whether the statement returned rows: `cursor.description` without
    the Column object it builds per column (~30 us of a one-job enqueue
    on a cold cache)."""
    result = cursor.pgresult
    return result is not None and result.nfields > 0


def fetch_tolerant(cursor: psycopg.Cursor[Any]) -> list[Any]:
    """Every row of the result; a value that cannot be loaded becomes an
    Unreadable (its PostgreSQL text) instead of failing the whole fetch, so
    listing and showing jobs still show such a job."""
    try:
        return cursor.fetchall()
    except _UNREADABLE:
        return _load_value_by_value(cursor)


async def fetch_tolerant_async(cursor: psycopg.AsyncCursor[Any]) -> list[Any]:
    """fetch_tolerant on an AsyncCursor (its rows are in memory already)."""
    try:
        return await cursor.fetchall()
    except _UNREADABLE:
        return _load_value_by_value(cursor)


def _load_value_by_value(cursor: psycopg.Cursor[Any] | psycopg.AsyncCursor[Any]) -> list[Any]:
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


def unreadable_message(row: Sequence[Any]) -> str:
    problems = "; ".join(v.describe() for v in row if isinstance(v, Unreadable))
    return f"the job holds a value Pulse cannot read, so it cannot run: {problems}"


def claim_order(job: Job) -> tuple[Any, ...]:
    return job.priority, job.run_at, job.id


def completed_attempt(row: Mapping[str, Any]) -> list[Attempt]:
    """A completed job's final attempt lives in the job row itself."""
    if row["state"] != JobState.COMPLETED.value:
        return []
    return [Attempt(attempt=row["attempt"], worker=row["lease_owner"],
                    started_at=row["started_at"], finished_at=row["finished_at"],
                    outcome="completed")]
