"""The machine-readable shapes of SPEC §9 (jobs, attempts), shared by
pulsectl --json, the control socket and the HTTP API."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pulsed.jobs import Attempt, JobRecord


def job_to_dict(record: JobRecord) -> dict[str, Any]:
    """A job as SPEC §9 shapes it; ``attempts`` only when the record has them."""
    job = {
        "id": record.id, "type": record.type, "queue": record.queue,
        "state": getattr(record.state, "value", record.state),
        "priority": record.priority, "attempt": record.attempt,
        "max_attempts": record.max_attempts, "payload": record.payload,
        "run_at": _iso(record.run_at), "created_at": _iso(record.created_at),
        "started_at": _iso(record.started_at), "finished_at": _iso(record.finished_at),
        "idempotency_key": record.idempotency_key, "last_error": record.last_error,
        "result": record.result, "progress": record.progress,
        "unique_while": record.unique_while, "unique_until": _iso(record.unique_until),
        "key_released_at": _iso(record.key_released_at),
    }
    if record.attempts is not None:
        job["attempts"] = [attempt_to_dict(a) for a in record.attempts]
    return job


def attempt_to_dict(attempt: Attempt) -> dict[str, Any]:
    return {
        "attempt": attempt.attempt, "worker": attempt.worker,
        "started_at": _iso(attempt.started_at), "finished_at": _iso(attempt.finished_at),
        "outcome": attempt.outcome, "error": attempt.error_message,
        "error_class": attempt.error_class, "traceback": attempt.traceback,
    }


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, default=str)


def _iso(moment: datetime | str | None) -> str | None:
    """ISO 8601; a stored value Python cannot read (an Unreadable) as its
    PostgreSQL text."""
    return moment.isoformat() if isinstance(moment, datetime) else moment
