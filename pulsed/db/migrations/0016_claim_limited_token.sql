-- Version 16: pulse_claim_limited as the other claims (queries.sql,
-- job_claim). Its body is version 2's with two changes:
--
-- * One lease token per call, not per row: gen_random_uuid() costs ~1.4 us
--   a call. Every write a worker makes is fenced by the (id, token) pair and
--   no other claim gets the same token, so the jobs of one call sharing it
--   are fenced exactly as before (tests/integration/test_jobs_fencing.py).
-- * The paused queues are read in key order, which an index-only scan of
--   their primary key provides; unordered, with the claim's settings (no
--   sequential scans) on a table nothing analyzes, the planner chose a
--   bitmap heap scan costing ~50 us more, once per limited type a claim.
CREATE OR REPLACE FUNCTION pulse_claim_limited(
    p_owner text, p_limit integer, p_lease_ttl float8, p_queues text[],
    p_types text[], p_concurrency integer[], p_rate_count integer[], p_rate_per float8[],
    p_default_types text[], p_default_attempts integer[]
) RETURNS SETOF pulse_jobs
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    i integer;
    t text;
    allowed integer;
    taken integer;
    remaining integer := p_limit;
    bucket float8;
    claim_token uuid := gen_random_uuid();  -- the lease token of every job this call claims
BEGIN
    FOR i IN SELECT s FROM generate_subscripts(p_types, 1) AS s ORDER BY p_types[s] LOOP
        EXIT WHEN remaining <= 0;
        t := p_types[i];
        PERFORM 1 FROM pulse_jobs WHERE type = t AND state = 'available' LIMIT 1;
        CONTINUE WHEN NOT FOUND;  -- nothing to do: take no lock
        PERFORM pg_advisory_xact_lock(hashtext('pulse.type.' || t));
        allowed := remaining;
        IF p_concurrency[i] IS NOT NULL THEN
            allowed := least(allowed, 1, p_concurrency[i] - (
                SELECT count(*) FROM pulse_jobs WHERE type = t AND state = 'running')::integer);
        END IF;
        IF p_rate_count[i] IS NOT NULL THEN
            INSERT INTO pulse_type_tokens AS b (type, tokens, refreshed_at)
            VALUES (t, greatest(1.0, p_rate_count[i] / 10.0), clock_timestamp())
            ON CONFLICT (type) DO UPDATE
            SET tokens = least(greatest(1.0, p_rate_count[i] / 10.0),
                               b.tokens + extract(epoch FROM clock_timestamp() - b.refreshed_at)
                                          * p_rate_count[i] / p_rate_per[i]),
                refreshed_at = clock_timestamp()
            RETURNING b.tokens INTO bucket;
            allowed := least(allowed, floor(bucket)::integer);
        END IF;
        CONTINUE WHEN allowed <= 0;
        RETURN QUERY
        WITH picked AS (
            SELECT id FROM pulse_jobs
            WHERE state = 'available' AND type = t
              AND (p_queues IS NULL OR queue = ANY(p_queues))
              AND queue <> ALL(ARRAY(SELECT queue FROM pulse_paused_queues ORDER BY queue))
            ORDER BY priority, run_at, id
            LIMIT allowed
            FOR UPDATE SKIP LOCKED
        )
        UPDATE pulse_jobs j
        SET state = 'running', attempt = j.attempt + 1, lease_owner = p_owner,
            lease_token = claim_token, started_at = now(),
            lease_expires_at = now() + make_interval(secs => p_lease_ttl),
            max_attempts = COALESCE(j.max_attempts,
                (SELECT d.m FROM unnest(p_default_types, p_default_attempts) AS d(dt, m)
                 WHERE d.dt = j.type), 20)
        FROM picked WHERE j.id = picked.id
        RETURNING j.*;
        GET DIAGNOSTICS taken = ROW_COUNT;
        remaining := remaining - taken;
        IF p_rate_count[i] IS NOT NULL AND taken > 0 THEN
            UPDATE pulse_type_tokens SET tokens = tokens - taken WHERE type = t;
        END IF;
    END LOOP;
END
$$;
