"""Writing what the worker's jobs did: completions in batches (with the
next claim, or flushed when they waited too long), give-backs, the
finished jobs' metrics and log lines, progress reports and cancels, from
the lease keeper's thread while handlers run."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from typing import Any

import psycopg

from pulsed import logs, metrics
from pulsed.jobs import RUNNING, Job
from pulsed.metrics import JobReport
from pulsed.worker_options import COMPLETED, FLUSH_AFTER_S, PROGRESS_EVERY_S

# The worker's records go to one logger, whichever module writes them
# (operators and tests filter on "pulsed.worker").
log = logging.getLogger("pulsed.worker")


class Completions:
    """Mixin of Worker: outcomes, progress and cancels."""

    def flush(self) -> None:
        """Write completions now (they are otherwise sent with the next claim)."""
        self._leave_if_forked()
        with self.db() as store:
            done = self.ledger.take_finished()
            held: set[int] = set()
            if done:
                try:
                    held = store.complete(done, self.ledger.results(done))
                except BaseException:
                    self.ledger.write_failed(done)
                    raise
                self._note_fenced(done, held)
                self.ledger.written(done)
        _warn_lost(done, held)
        self._flush_reports()

    def _give_back(self, jobs: list[Job]) -> None:
        if jobs:
            with self.db() as store:
                given = store.give_back(jobs)
                if given:
                    store.notify(sorted({r["queue"] for r in given}))

    def _finish_up(self) -> None:
        """On the way out: write completions, return unstarted jobs."""
        self._flush_reports()
        try:
            self._give_back(self.ledger.take_unstarted())
            self.flush()
        except psycopg.Error as exc:
            log.warning("could not write final outcomes (%s); leases will expire and "
                        "the jobs run again", exc)

    def _report(self, report: JobReport) -> None:
        with self._reports_lock:
            if not self._reports:
                self._reports_since = time.monotonic()
            self._reports.append(report)
        if report.outcome != COMPLETED:
            self._flush_reports()  # rare, and its database write was just made

    def _note_fenced(self, done: list[Job], held: set[int]) -> None:
        """Completions the lease fence refused (the lease was reaped or
        taken over) are reported as lost, not completed. Noted before the
        jobs leave the ledger, so no flush can count them completed."""
        if len(held) < len(done):
            with self._reports_lock:
                self._fenced.update(job.id for job in done if job.id not in held)

    def _flush_reports(self) -> None:
        """The metrics and log lines of the jobs finished since the last
        call, written together: with the completions, or by the lease
        keeper's thread while a later job runs long. A completed job is
        reported once its completion was written (fenced: as lost), so
        /metrics counts what the database has."""
        unwritten = self.ledger.unwritten_ids()
        with self._reports_lock:
            reports, self._reports = self._reports, []
            if unwritten:
                self._reports = [r for r in reports
                                 if r.outcome == COMPLETED and r.job.id in unwritten]
                reports = [r for r in reports
                           if r.outcome != COMPLETED or r.job.id not in unwritten]
            if self._fenced:
                reports = [self._fence_report(r) for r in reports]
        if reports:
            metrics.jobs_finished(reports)
            logs.job_outcomes(log, reports)

    def _keeper_tick(self) -> None:
        """Every lease keeper tick: late completions, cancellations heard
        while handlers run, progress reports, cancelled tasks past grace."""
        try:
            self._flush_behind_long_job()
            self._route_pending_notifies()
            self._write_progress()
        finally:  # no database needed: a failed write above must not keep a
            self._stop_cancelled()  # cancelled task running (the master's kill would follow)

    def _write_progress(self) -> None:
        now = time.monotonic()
        if now - self._progress_written < PROGRESS_EVERY_S:
            return
        jobs = self.ledger.progress_due()
        if not jobs:
            return
        reports = [_current_report(job) for job in jobs]
        pairs = [(job, _progress_json(report)) for job, report in zip(jobs, reports) if report]
        if pairs:
            with self.db() as store:
                store.write_progress([job for job, _ in pairs], [text for _, text in pairs])
        self._progress_written = now

    def _stop_cancelled(self) -> None:
        """Cancelled jobs still running past cancel_grace: an async task is
        cancelled here; a sync handler is stopped by the master, which
        kills the process at the deadline the cancel set on the board."""
        for job in self.ledger.cancelled_overdue():
            future = self._async_jobs.get(job.id)
            if future is not None and future.cancel():
                log.warning("job %s#%d: still running %.0fs after it was cancelled; its task "
                            "is cancelled", job.type, job.id, self.options.cancel_grace)

    def _on_cancel(self, payload: str) -> None:
        try:
            job_id = int(payload)
        except ValueError:
            return
        job = self.ledger.cancelled(job_id, self.options.cancel_grace)
        if job is not None:
            log.info("job %s#%d was cancelled; its handler has %.0fs to stop", job.type, job.id,
                     self.options.cancel_grace)

    def _fence_report(self, report: JobReport) -> JobReport:
        if report.outcome != COMPLETED or report.job.id not in self._fenced:
            return report
        self._fenced.discard(report.job.id)
        return report._replace(outcome=metrics.FENCED)

    def _flush_behind_long_job(self) -> None:
        """The lease keeper's thread, each tick: outcomes older than
        FLUSH_AFTER_S (their job ended, and a later one is still running,
        or the node drains) are written from here instead of waiting for
        the next claim."""
        if self.ledger.finished_for() > FLUSH_AFTER_S:
            self.flush()  # reports the completions it writes
        with self._reports_lock:
            reports_due = bool(self._reports) and (
                time.monotonic() - self._reports_since > FLUSH_AFTER_S)
        if reports_due:
            self._flush_reports()


def _current_report(job: Job) -> dict[str, Any] | None:
    """The job's unwritten progress report, if its current attempt made it
    (checked again: a thread left behind may have reported since
    progress_due)."""
    lease, report = RUNNING.progress.pop(job.id, (None, None))
    return report if lease == job.lease_token else None


def _progress_json(report: dict[str, Any]) -> str:
    at = datetime.fromtimestamp(report["at"], timezone.utc).isoformat()
    return json.dumps({**report, "at": at}, ensure_ascii=False)


def _warn_lost(done: list[Job], held: set[int]) -> None:
    for job in done:
        if job.id not in held:
            log.warning("job %s#%d: lease lost before completion; its result is dropped",
                        job.type, job.id)

