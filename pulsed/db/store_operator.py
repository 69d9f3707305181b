"""The Store's operator side: what pulsectl and the HTTP API show and do
(jobs, their attempts, queue depths; cancel and retry)."""

from __future__ import annotations

from typing import Any

from pulsed.db.rows import completed_attempt, job_record
from pulsed.db.sql import queries
from pulsed.db.store_base import StoreBase
from pulsed.jobs import Attempt, JobRecord

# a page of jobs (GET /jobs, pulsectl jobs) carries about this much of their
# payloads and results at most, whatever its limit
MAX_LIST_BYTES = 16 * 1024 * 1024

class OperatorQueries(StoreBase):
    # -- operators ----------------------------------------------------------------

    def cancel(self, job_id: int) -> bool:
        return bool(self._rows("job_cancel", {"id": job_id}))

    def retry(self, job_id: int) -> bool:
        rows = self._rows("job_retry", {"id": job_id})
        if rows:
            self.notify([rows[0]["queue"]])
        return bool(rows)

    def get_job(self, job_id: int, *, with_attempts: bool = True) -> JobRecord | None:
        rows = self._shown_rows("job_get", {"id": job_id})
        if not rows:
            return None
        attempts = None
        if with_attempts:
            attempts = [Attempt(**r) for r in self._shown_rows("job_attempts", {"id": job_id})]
            attempts += completed_attempt(rows[0])
        return job_record(rows[0], attempts)

    def get_jobs(self, job_ids: list[int]) -> dict[int, JobRecord]:
        """get_job without attempts for many jobs at once, by id."""
        return {r["id"]: job_record(r) for r in self._shown_rows("jobs_get_by_ids",
                                                                 {"ids": job_ids})}

    def list_jobs(self, *, state: str | None = None, type: str | None = None,
                  after: int | None = None, limit: int = 50) -> list[JobRecord]:
        return self.list_jobs_page(state=state, type=type, after=after, limit=limit)[0]

    def list_jobs_page(self, *, state: str | None = None, type: str | None = None,
                       after: int | None = None, limit: int = 50
                       ) -> tuple[list[JobRecord], int | None]:
        """Newest first, at most `limit` jobs and MAX_LIST_BYTES of their
        payloads and results (at least one job); and the `after` of the next
        page, None if this is the last."""
        max_bytes = MAX_LIST_BYTES
        rows = self._shown_rows("job_list", {"state": state, "type": type, "after": after,
                                             "limit": limit, "max_bytes": max_bytes})
        shown = [r for r in rows if r["bytes_before"] < max_bytes]
        more = len(rows) == limit or len(shown) < len(rows)
        return [job_record(r) for r in shown], (shown[-1]["id"] if shown and more else None)

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

    def connection_usage(self) -> dict[str, int]:
        """{pulse, total, available}: client connections now, and the limit."""
        return self._rows("connection_usage", {})[0]

    def oldest_available_age(self) -> float | None:
        row = self.conn.execute(queries()["oldest_available_age"]).fetchone()
        return row[0] if row else None
