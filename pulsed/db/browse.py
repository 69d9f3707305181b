"""The console's reads and bulk writes on jobs (issue 19): the job browser's
pages and counts, bulk retry / cancel / delete by filter, the cluster's
processes and the charts' series. SQL in queries.sql ("The operator's
console" section); functions over a Store's connection, so the Store stays
as it is.

Bulk actions run in batches of BULK_BATCH jobs, each batch one short
statement (its own transaction on an autocommit connection) that locks its
rows with SKIP LOCKED: a job a worker holds locked at that instant is left
out rather than waited for, and no lock is held between batches."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from psycopg.rows import dict_row

from pulsed.db.rows import fetch_tolerant
from pulsed.db.store import Store, queries

log = logging.getLogger(__name__)

BULK_BATCH = 1000
COUNT_CAP = 1000  # the browser counts up to this ("1000+" beyond): < 50 ms on 5M jobs
MAX_PAGE = 500
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)

# Which states each bulk action applies to (the single-job rules).
ACTION_STATES: dict[str, tuple[str, ...]] = {
    "cancel": ("scheduled", "available", "running", "retryable"),
    "retry": ("completed", "failed", "cancelled", "retryable", "scheduled"),
    # A running job is cancelled first: deleting it under its worker would
    # lose the attempt's record.
    "delete": ("scheduled", "available", "retryable", "completed", "failed", "cancelled"),
}


@dataclass(frozen=True)
class JobFilter:
    """Which jobs: every field None means any."""

    id: int | None = None
    state: str | None = None
    type: str | None = None
    queue: str | None = None
    older_than: float | None = None  # seconds since finished (or created, if not finished)
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before
    error: str | None = None  # a substring of the last error, any case

    def is_empty(self) -> bool:
        return all(value is None for value in asdict(self).values())

    def describe(self) -> str:
        parts = [f"{key}={value}" for key, value in asdict(self).items() if value is not None]
        return " ".join(parts) or "every job"


@dataclass(frozen=True)
class BulkResult:
    action: str
    matched: int  # counted before (the dry run's number)
    changed: int
    skipped: int  # matched but locked at that instant (a worker was writing it)
    batches: int


def _rows(store: Store, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    # prepare=False: planned with these values every time, so unused
    # filters fold away (a generic plan of "x IS NULL OR ..." cannot).
    with store.conn.cursor(row_factory=dict_row) as cur:
        cur.execute(queries()[name], params, prepare=False)
        return fetch_tolerant(cur) if cur.description else []


def error_pattern(text: str | None) -> str | None:
    """The ILIKE pattern matching `text` anywhere, any case: its %, _ and
    the escape character \\ stand for themselves."""
    if text is None:
        return None
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# pg_trgm looks a LIKE pattern up by the trigrams of its words: a text
# without three letters or digits in a row has none, and the index would
# be read whole (2 characters on 250,000 errors: 260 ms, against a scan
# that stops at the count's cap).
_HAS_TRIGRAM = re.compile(r"[^\W_]{3}")


def error_params(text: str | None) -> dict[str, str | None]:
    """The error search's parameters: an ILIKE pattern the trigram index
    (migration 0014) serves, or for a text it cannot serve a plain
    substring (`error_text`); both match the text anywhere, any case."""
    if text is not None and not _HAS_TRIGRAM.search(text):
        return {"error_like": None, "error_text": text}
    return {"error_like": error_pattern(text), "error_text": None}


def _browse_params(flt: JobFilter) -> dict[str, Any]:
    return {"state": flt.state, "type": flt.type, "queue": flt.queue, "since": flt.since,
            "until": flt.until, **error_params(flt.error)}


FINISHED_STATES = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: below this id (and, for a finished
    state's pages, which go by finish time, below this finished_at)."""

    id: int
    finished_at: datetime | None = None

    def text(self) -> str:
        """"ID", or "MICROSECONDS~ID" (since 1970, UTC): nothing a URL must escape."""
        if self.finished_at is None:
            return str(self.id)
        return f"{(self.finished_at - _EPOCH) // _MICROSECOND}~{self.id}"

    @classmethod
    def parse(cls, text: str) -> "Cursor":
        """From text(); ValueError if it is not one."""
        at, tilde, job_id = text.rpartition("~")
        if not all(part.isascii() and part.isdigit() and len(part) <= 19
                   for part in ((at, job_id) if tilde else (job_id,))):
            raise ValueError(text)
        try:
            finished_at = _EPOCH + int(at) * _MICROSECOND if tilde else None
        except OverflowError:
            raise ValueError(text) from None
        return cls(int(job_id), finished_at)


def _matches(row: Mapping[str, Any], flt: JobFilter) -> bool:
    """The job named by id passes the filter's other fields, as the count
    and the bulk actions apply them (it was listed whatever they said)."""
    error = (row["last_error"] or "").lower()
    return ((flt.state is None or str(row["state"]) == flt.state)
            and (flt.type is None or row["type"] == flt.type)
            and (flt.queue is None or row["queue"] == flt.queue)
            and (flt.since is None or row["created_at"] >= flt.since)
            and (flt.until is None or row["created_at"] < flt.until)
            and (flt.error is None or flt.error.lower() in error))


def list_page(store: Store, flt: JobFilter, *, after: Cursor | None = None,
              limit: int = 50) -> tuple[list[dict[str, Any]], Cursor | None]:
    """A page of matching jobs and the cursor of the next one (None: last
    page). Newest first: by id, or for a finished state by finish time."""
    limit = min(limit, MAX_PAGE)
    if flt.id is not None:
        rows = [r for r in _rows(store, "job_get", {"id": flt.id})
                if (after is None or r["id"] < after.id) and _matches(r, flt)]
        return rows, None
    by_finish = flt.state in FINISHED_STATES
    params = {**_browse_params(flt), "after": after.id if after else None, "limit": limit}
    if by_finish:
        params["after_at"] = after.finished_at if after else None
    rows = _rows(store, "browse_list_finished" if by_finish else "browse_list", params)
    if len(rows) < limit:
        return rows, None
    last = rows[-1]
    return rows, Cursor(last["id"], last["finished_at"] if by_finish else None)


def count_query(flt: JobFilter) -> str:
    """Which count: an error search in one state counts in that state's
    page order, so a text found in many errors stops at the cap early
    (queries.sql says what each plan costs)."""
    if flt.state is None or error_params(flt.error)["error_like"] is None:
        return "browse_count"  # no search, or a substring test no index serves: in table order
    return "browse_count_error_finished" if flt.state in FINISHED_STATES else "browse_count_error"


def count_capped(store: Store, flt: JobFilter, cap: int = COUNT_CAP) -> tuple[int, bool]:
    """(count, exact): counted up to `cap`; exact is False when there are more."""
    rows = _rows(store, count_query(flt), {**_browse_params(flt), "cap": cap + 1})
    count = rows[0]["count"]
    return min(count, cap), count <= cap


def _bulk_params(action: str, flt: JobFilter) -> dict[str, Any] | None:
    """The statement's parameters; None when the filter's state is one the
    action never applies to (nothing can match)."""
    allowed = ACTION_STATES[action]
    if flt.state is not None and flt.state not in allowed:
        return None
    states = [flt.state] if flt.state is not None else list(allowed)
    return {"states": states, "id": flt.id, "type": flt.type, "queue": flt.queue,
            "older_than": flt.older_than, **error_params(flt.error)}


def bulk_count(store: Store, action: str, flt: JobFilter) -> int:
    """How many jobs `action` would change now (exact)."""
    params = _bulk_params(_checked_action(action), flt)
    if params is None:
        return 0
    return _rows(store, "bulk_count", params)[0]["count"]


def bulk_apply(store: Store, action: str, flt: JobFilter, *, who: str,
               batch: int = BULK_BATCH,
               on_batch: Callable[[int], None] | None = None) -> BulkResult:
    """Apply `action` to every matching job, newest first, batch by batch.
    `who` (a token's name, or pulsectl's user) goes to the log."""
    params = _bulk_params(_checked_action(action), flt)
    matched = 0 if params is None else bulk_count(store, action, flt)
    log.info("bulk %s by %s: %d jobs match (%s)", action, who, matched, flt.describe())
    changed = skipped = batches = 0
    below: int | None = None
    while params is not None:
        row = _rows(store, f"bulk_{action}_batch", {**params, "below": below, "batch": batch})[0]
        batches += 1
        changed += row["changed"]
        if row["queues"]:
            store.notify(sorted(row["queues"]))
        if on_batch is not None:
            on_batch(changed)
        if row["selected"] < batch or row["last_id"] is None:
            break
        below = row["last_id"]
    skipped = max(matched - changed, 0)
    log.info("bulk %s by %s: %d jobs changed in %d batches (%s)", action, who, changed,
             batches, flt.describe())
    return BulkResult(action, matched, changed, skipped, batches)


def _checked_action(action: str) -> str:
    if action not in ACTION_STATES:
        raise ValueError(f"unknown bulk action {action!r}; one of {', '.join(ACTION_STATES)}")
    return action


# -- the console's other reads ----------------------------------------------------

def job_lease(store: Store, job_id: int) -> dict[str, Any] | None:
    rows = _rows(store, "job_lease", {"id": job_id})
    return rows[0] if rows else None


def cluster_processes(store: Store) -> list[dict[str, Any]]:
    """Every registered process, each with `running`: its jobs running now."""
    running = {r["lease_owner"]: r["running"] for r in _rows(store, "cluster_running", {})}
    rows = _rows(store, "cluster_processes", {})
    for row in rows:
        row["running"] = running.get(f"{row['node_id']}/{row['role']}-{row['idx']}/{row['pid']}",
                                     0 if row["role"] == "worker" else None)
    return rows


def stats_series(store: Store, window_s: float) -> list[dict[str, Any]]:
    return _rows(store, "stats_series", {"window": window_s})
