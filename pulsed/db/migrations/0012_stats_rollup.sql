-- Version 12: the console's charts (issue 19). Once per bucket (10 s) the
-- leader rolls up what finished in the last bucket, per queue and type:
-- completed and failed jobs, retried attempts, pickup latency (p50, p95 of
-- started_at - run_at of the jobs that finished) and the waiting depth. The
-- workers' fast path writes nothing here; the rollup reads the finished
-- index by time. The leader deletes buckets older than an hour, so the
-- table holds at most 360 buckets x the (queue, type) pairs in use.
CREATE TABLE pulse_stats (
    bucket        timestamptz NOT NULL,
    queue         text NOT NULL,
    type          text NOT NULL,
    completed     integer NOT NULL DEFAULT 0,
    failed        integer NOT NULL DEFAULT 0,
    retried       integer NOT NULL DEFAULT 0,
    waiting       integer NOT NULL DEFAULT 0,
    pickup_p50_s  real,
    pickup_p95_s  real,
    PRIMARY KEY (bucket, queue, type)
);

-- Retried attempts are counted by when they ended; failures are off the
-- hot path, so this index costs the workers nothing per successful job.
CREATE INDEX pulse_job_attempts_finished_idx ON pulse_job_attempts (finished_at);
