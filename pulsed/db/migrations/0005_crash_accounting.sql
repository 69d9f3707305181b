-- Version 5: every execution mode keeps every rule (crash accounting).
--
-- `interrupted`: an attempt stopped by an operator's stop or recycle past
-- its timeout, or by the hard kill of a sibling job in the same worker. It
-- is recorded and gives its attempt back.
ALTER TABLE pulse_job_attempts DROP CONSTRAINT pulse_job_attempts_outcome_check;
ALTER TABLE pulse_job_attempts ADD CONSTRAINT pulse_job_attempts_outcome_check CHECK (outcome IN (
    'completed', 'error', 'timeout', 'worker_died', 'lease_expired', 'snoozed', 'cancelled',
    'failed', 'interrupted'));

-- How many of a job's latest attempts ended worker_died or timeout in a
-- row (interrupted and snoozed attempts are not the job's doing and are
-- stepped over; any other outcome ends the streak). A job that keeps
-- killing its worker or hanging is failed once the streak reaches
-- worker.poison_after, instead of taking a worker down max_attempts times.
CREATE FUNCTION pulse_crash_streak(p_job_id bigint) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT count(*)::integer FROM pulse_job_attempts a
    WHERE a.job_id = p_job_id AND a.outcome IN ('worker_died', 'timeout')
      AND a.id > COALESCE((SELECT max(b.id) FROM pulse_job_attempts b
                           WHERE b.job_id = p_job_id
                             AND b.outcome NOT IN ('worker_died', 'timeout', 'interrupted',
                                                   'snoozed')), 0)
$$;

-- When a failed attempt is retried: exponential backoff with jitter, the
-- same rule as the worker's backoff_seconds() (pulsed/jobs.py holds the
-- numbers and passes them in), for the attempts the database ends itself
-- (a dead worker's, an expired lease's). The exponent is capped so a large
-- attempt number cannot overflow.
CREATE FUNCTION pulse_retry_at(p_attempt integer, p_base float8, p_cap float8, p_jitter float8)
RETURNS timestamptz
LANGUAGE sql VOLATILE AS $$
    SELECT now() + make_interval(secs =>
        LEAST(p_cap, p_base * 2 ^ LEAST(GREATEST(p_attempt - 1, 0), 40))
        * (1 + p_jitter * (2 * random() - 1)))
$$;
