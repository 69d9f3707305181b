-- Version 9: jobs that answer back (results, progress, waiting for a job's end).
--
-- result: a handler's non-None return value (JSON), written by the same
-- fenced statement as the completion, in the same batch.
ALTER TABLE pulse_jobs ADD COLUMN result jsonb;
-- progress: the latest {fraction, message, at} a running handler reported
-- (job.progress()), written about once a second, fenced by the lease.
ALTER TABLE pulse_jobs ADD COLUMN progress jsonb;

-- Who waits for which job (pulsed.wait, GET /jobs/{id}?wait=): a finishing
-- statement sends NOTIFY pulse_done only for jobs listed here, so the fast
-- path pays one probe of an empty table per batch while nobody waits. A
-- waiter deletes its row when done; a waiter that died leaves a row that
-- goes with its job (cascade) when the job is pruned.
CREATE TABLE pulse_job_waiters (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id     bigint NOT NULL REFERENCES pulse_jobs (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pulse_job_waiters_job_idx ON pulse_job_waiters (job_id);
