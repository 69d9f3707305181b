-- Version 8: workers claim only the types they have handlers for, and the
-- cluster knows which types some live worker handles.
--
-- Available jobs of one type, oldest first. While many waiting jobs of
-- other types come first, a worker's claim (job_claim_by_type) walks each
-- handled type apart: in priority order on type_available_idx, and for the
-- jobs past the aging bound, oldest first on this index. Without it the
-- overdue part walked every older job of the types it skips. Rows enter
-- this index only on enqueue and retry, never on the claim/complete path.
CREATE INDEX pulse_jobs_type_aging_idx
    ON pulse_jobs (type, run_at, id) WHERE state = 'available';

-- The types each worker process has handlers for, written once by the
-- worker when it starts. A row counts while the process registry lists
-- that (node_id, pid) as a live worker; its node's scheduler drops it once
-- the registry no longer does (process_heartbeat_many's transaction).
CREATE TABLE pulse_worker_types (
    node_id       text NOT NULL,
    pid           integer NOT NULL,
    types         text[] NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, pid)
);
