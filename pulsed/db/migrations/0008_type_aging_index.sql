-- Version 8: available jobs of one type, oldest first.
--
-- A worker claims only the types it has handlers for. While many waiting
-- jobs of other types come first, its claim (job_claim_by_type) walks each
-- handled type apart: in priority order on type_available_idx, and for the
-- jobs past the aging bound, oldest first on this index. Without it the
-- overdue part walked every older job of the types it skips. Rows enter
-- this index only on enqueue and retry, never on the claim/complete path.
CREATE INDEX pulse_jobs_type_aging_idx
    ON pulse_jobs (type, run_at, id) WHERE state = 'available';
