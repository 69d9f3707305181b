"""pulsed.wait(): block until a job finishes, without polling.

The waiter registers in pulse_job_waiters and LISTENs on pulse_done; the
statements that finish a job (completion batches, a failure, a cancel)
send NOTIFY pulse_done with the job's id only for jobs someone waits for,
so nobody waiting costs the fast path nothing but one probe of an empty
table per batch. A job failed by the master or the reaper (its worker
died on its last attempt) sends none: the waiter re-reads the job every
RECHECK_S as a safety net, a read per second per waiter, never a loop.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from pulsed.db.store import Store
from pulsed.errors import JobNotFound, PulseError
from pulsed.jobs import JobRecord

RECHECK_S = 1.0


class WaitError(PulseError):
    """pulsed.wait() cannot wait on this connection."""


def wait(conn: psycopg.Connection[Any], job_id: int, timeout: float | None = None) -> JobRecord:
    """Return the job once it is finished (completed, failed or
    cancelled: `state`, `result`, `last_error`); TimeoutError if it is not
    within `timeout` seconds (None: wait for ever); JobNotFound if there is
    no such job. The connection must not be inside a transaction (LISTEN
    and the waiter row must commit to take effect)."""
    if not conn.autocommit and conn.info.transaction_status != TransactionStatus.IDLE:
        raise WaitError("pulsed.wait() needs a connection outside a transaction: commit (or "
                        "roll back) first, or pass an autocommit connection")
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"timeout must be None or >= 0 seconds, got {timeout!r}")
    autocommit = conn.autocommit
    conn.autocommit = True
    try:
        return _wait(conn, Store(conn), job_id, timeout)
    finally:
        conn.autocommit = autocommit


def _wait(conn: psycopg.Connection[Any], store: Store, job_id: int,
          timeout: float | None) -> JobRecord:
    deadline = None if timeout is None else time.monotonic() + timeout
    store.listen_for_ends()
    waiter = store.waiter_add(job_id)
    try:
        if waiter is None:
            raise JobNotFound(job_id)
        while True:
            record = store.get_job(job_id, with_attempts=False)
            if record is None:
                raise JobNotFound(job_id)
            if record.state.is_finished:
                return record
            remaining = RECHECK_S if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"job {job_id} is still {record.state.value} after "
                                   f"{timeout:g}s")
            _until_ended(conn, job_id, min(remaining, RECHECK_S))
    finally:
        if not conn.closed:
            if waiter is not None:
                store.waiter_remove(waiter)
            store.listen_for_ends(False)


def _until_ended(conn: psycopg.Connection[Any], job_id: int, seconds: float) -> None:
    """Sleep until this job's NOTIFY comes or `seconds` pass."""
    wanted = str(job_id)
    for notify in conn.notifies(timeout=seconds):
        if notify.payload == wanted:
            return
