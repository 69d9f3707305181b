-- Version 11: the console's job browser (issue 19). Its pages walk the
-- primary key backwards (waiting and running jobs: the newest part of the
-- table) or, for a finished state, the retention index by finish time; its
-- counts stop at 1,000. Neither is quick for the rare states: counting the
-- failed jobs among 5,000,000 completed ones would read them all. This
-- partial index holds only the rare states. Rows enter them off the hot path
-- (a retry, a final failure, a cancel, a delayed enqueue), so claims and
-- completions never write to it (migration 0003 measured what a full
-- (type, state) index cost them: ~25%).
--
-- Not CONCURRENTLY: migrations run in one transaction. The build reads the
-- table once under a SHARE lock (writes wait): measured at 0.9 s on
-- 5,100,000 rows (docs/console.md), once, at upgrade.
CREATE INDEX pulse_jobs_browse_idx ON pulse_jobs (state, id)
    WHERE state IN ('scheduled', 'retryable', 'failed', 'cancelled');
