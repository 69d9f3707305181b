-- Every SQL statement Pulse runs, by name. pulsed/db/store.py executes them.
-- Format: "-- name: noun_verb", comment lines describing it, then the SQL.
-- Writes by a worker are fenced by (id, lease_token, state = 'running'):
-- a worker whose lease was taken away matches no row and changes nothing.
-- The batch forms spell the state test `state::text = 'running'` on
-- purpose: then only the primary key can find the rows, one index probe
-- per id. With `state = 'running'` the planner may walk the partial lease
-- index (statistics taken while nothing ran say it holds one row) and test
-- every (id, token) pair against every running job: 100 completions
-- beside 100 other leases cost 8 ms instead of 1 ms.

-- name: job_insert
-- Insert one job and wake idle workers when it can run now, in one
-- statement; with an idempotency key already held (the unique index of
-- migration 0010 covers exactly the holders), insert nothing (the caller
-- then looks the holder up). run_at and its state are computed from the
-- database clock. The NOTIFY is sent when the transaction commits. A
-- unique_for period starts at this statement, not at the transaction's
-- start, so a long transaction does not enqueue a job whose hold is over.
-- No CTEs: the NOTIFY is sent from RETURNING, once for the row inserted
-- (no row, no NOTIFY), and run_at comes from a subquery the planner
-- folds in. Written as CTEs (params, inserted, woken) the statement took
-- ~120 us to execute instead of ~70, ~40 us of a one-job enqueue's round
-- trip (W2's latency starts here).
INSERT INTO pulse_jobs (type, queue, payload, priority, state, max_attempts,
                        run_at, idempotency_key, timeout_s, unique_while, unique_until,
                        trace_context)
SELECT %(type)s, %(queue)s, %(payload)s::jsonb, %(priority)s,
       CASE WHEN params.run_at > now() THEN 'scheduled' ELSE 'available' END::pulse_job_state,
       %(max_attempts)s, params.run_at, %(idempotency_key)s, %(timeout)s,
       %(unique_while)s,
       statement_timestamp() + make_interval(secs => %(unique_for)s::float8),
       %(trace_context)s::jsonb
FROM (SELECT COALESCE(%(run_at)s::timestamptz,
                      now() + make_interval(secs => %(delay)s::float8)) AS run_at) AS params
ON CONFLICT (idempotency_key)
WHERE idempotency_key IS NOT NULL AND key_released_at IS NULL
  AND (unique_while IS NULL OR state NOT IN ('completed', 'failed', 'cancelled'))
DO NOTHING
RETURNING id, state,
          CASE WHEN state = 'available' THEN pg_notify('pulse_jobs', queue) END AS woken

-- name: job_id_by_idempotency_key
-- The job holding a key (the same predicate as the unique index, which
-- finds it), and whether its unique_for period is over: the caller then
-- releases it (job_keys_release) and inserts again.
SELECT id, COALESCE(unique_until <= statement_timestamp(), false) AS expired
FROM pulse_jobs
WHERE idempotency_key = %(idempotency_key)s AND key_released_at IS NULL
  AND (unique_while IS NULL OR state NOT IN ('completed', 'failed', 'cancelled'))

-- name: job_keys_release
-- Release the keys of holders whose unique_for period is over: the rows
-- leave the unique index, so the key can be inserted again. The row lock
-- orders racing enqueues: the second finds the key released (no row), then
-- meets the first one's new job at its insert. A holder still running keeps
-- that lock until the enqueuing transaction ends: its completion waits that
-- long (once per period, and only for a job that outlived its period).
UPDATE pulse_jobs SET key_released_at = statement_timestamp()
WHERE id = ANY(%(ids)s::bigint[]) AND key_released_at IS NULL
  AND unique_until <= statement_timestamp()
RETURNING id

-- name: job_insert_many
-- Bulk insert, one statement for the whole batch, rows inserted in input
-- order (so their ids ascend in that order); rows whose idempotency key is
-- held (see job_insert) are skipped (a batch without keys cannot conflict: the store sends
-- it without the conflict clause below). Wakes idle workers once per queue
-- given jobs that can run now. Arrays are sent in binary format: no text
-- escaping of 1,000 payloads; an array of NULLs only may be sent as one
-- NULL, which unnest() pads like one.
WITH inserted AS (
    INSERT INTO pulse_jobs (type, queue, payload, priority, state, max_attempts,
                            run_at, idempotency_key, timeout_s, unique_while, unique_until,
                            trace_context)
    SELECT u.type, u.queue, u.payload::jsonb, u.priority,
           CASE WHEN u.run_at > now() THEN 'scheduled' ELSE 'available' END::pulse_job_state,
           u.max_attempts, u.run_at, u.idempotency_key, u.timeout_s, u.unique_while,
           statement_timestamp() + make_interval(secs => u.unique_for),
           u.trace_context::jsonb
    FROM (
        SELECT v.*, COALESCE(v.at, now() + make_interval(secs => v.delay)) AS run_at
        FROM unnest(%(types)b::text[], %(queues)b::text[], %(payloads)b::text[],
                    %(priorities)b::smallint[], %(max_attempts)b::int[],
                    %(run_ats)b::timestamptz[], %(delays)b::float8[],
                    %(idempotency_keys)b::text[], %(timeouts)b::real[],
                    %(unique_whiles)b::text[], %(unique_fors)b::float8[],
                    %(trace_contexts)b::text[])
             WITH ORDINALITY AS v(type, queue, payload, priority, max_attempts, at, delay,
                                  idempotency_key, timeout_s, unique_while, unique_for,
                                  trace_context, ord)
    ) u
    ORDER BY u.ord
    ON CONFLICT (idempotency_key)
    WHERE idempotency_key IS NOT NULL AND key_released_at IS NULL
      AND (unique_while IS NULL OR state NOT IN ('completed', 'failed', 'cancelled'))
    DO NOTHING
    RETURNING id, idempotency_key, queue, state, priority, max_attempts, run_at, created_at,
              unique_until
), woken AS (
    SELECT pg_notify('pulse_jobs', q.queue)
    FROM (SELECT DISTINCT queue FROM unnest(%(queues)b::text[]) AS queue) q
    WHERE EXISTS (SELECT 1 FROM inserted i WHERE i.queue = q.queue AND i.state = 'available')
)
-- The HTTP API's enqueue group adds the columns it answers a new job with
-- after `woken` (store_enqueue.py: not sent back to enqueue_many, for which
-- loading them made a 1,000-job insert ~1.4 times as slow).
SELECT id, idempotency_key, state, (SELECT count(*) FROM woken) AS woken FROM inserted

-- name: job_ids_by_idempotency_keys
-- job_id_by_idempotency_key for many keys.
SELECT idempotency_key, id, state,
       COALESCE(unique_until <= statement_timestamp(), false) AS expired
FROM pulse_jobs
WHERE idempotency_key = ANY(%(keys)s::text[]) AND key_released_at IS NULL
  AND (unique_while IS NULL OR state NOT IN ('completed', 'failed', 'cancelled'))

-- name: job_trace_context
-- The trace context a job was enqueued with (migration 0013), for the
-- worker's span of an attempt when tracing is on (pulsed.contrib.otel).
SELECT trace_context FROM pulse_jobs WHERE id = %(id)s

-- name: jobs_notify
-- Wake idle workers: one notification per transaction and queue is enough
-- (PostgreSQL folds identical notifications within a transaction).
SELECT pg_notify('pulse_jobs', q) FROM unnest(%(queues)s::text[]) AS q

-- name: job_claim
-- Lease up to `limit` available jobs to `owner`, skipping rows other
-- claimers hold. Jobs that waited longer than `aging` seconds come first,
-- oldest first (so no priority starves); the rest by priority, then age.
-- Types with limits are left to pulse_claim_limited(). The attempt is
-- counted here, so a worker that dies mid-job has used the attempt.
-- Every filter is a per-row test (paused queues as a one-time array), so
-- each part stays an ordered index scan that stops after `limit` rows.
-- The paused queues are read in key order: then an index-only scan of
-- their primary key reads them. Unordered, with the claim's settings
-- (claim_plan_settings: no sequential scans) and a table never analyzed,
-- the planner chose a bitmap heap scan, whose set-up costs ~50 us more,
-- twice per claim (a fifth of a one-job claim's execution).
-- `handled` (NULL: every type) keeps jobs of types this worker has no
-- handler for waiting, untouched, for a worker that has one. Per row too:
-- cheap while few such jobs come first, a walk over all of them when many
-- do (job_claim_by_type is the claim for that case).
-- The ranked part only fills what the overdue part left: on a backlog where
-- every job is overdue it locks nothing (both locking `limit` rows, then
-- keeping half, doubled the locks and held back the other workers).
-- A job enqueued without max_attempts gets its type's from
-- `attempts_by_type` (a JSON object), else `fallback_attempts`: a lookup
-- per row (a subquery over two arrays was ~1 us a row more).
-- One lease token per claim, not per row: `(SELECT gen_random_uuid())` is
-- an InitPlan, run once (gen_random_uuid() costs ~1.4 us a call, a twentieth
-- of the server's work per job of a drain). Every write a worker makes is
-- fenced by the (id, token) pair, and no other claim gets the same token,
-- so the jobs of one claim sharing it are fenced exactly as before.
WITH overdue AS (
    SELECT id FROM pulse_jobs
    WHERE state = 'available' AND %(aging)s::float8 > 0
      AND run_at < now() - make_interval(secs => %(aging)s::float8)
      AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
      AND (%(handled)s::text[] IS NULL OR type = ANY(%(handled)s::text[]))
      AND type <> ALL(%(limited)s::text[])
      AND queue <> ALL(ARRAY(SELECT queue FROM pulse_paused_queues ORDER BY queue))
    ORDER BY run_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), ranked AS (
    SELECT id FROM pulse_jobs
    WHERE state = 'available'
      AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
      AND (%(handled)s::text[] IS NULL OR type = ANY(%(handled)s::text[]))
      AND type <> ALL(%(limited)s::text[])
      AND queue <> ALL(ARRAY(SELECT queue FROM pulse_paused_queues ORDER BY queue))
      -- SKIP LOCKED does not skip rows this transaction locked in overdue
      AND id <> ALL(ARRAY(SELECT id FROM overdue))
    ORDER BY priority, run_at, id
    LIMIT %(limit)s - (SELECT count(*) FROM overdue)
    FOR UPDATE SKIP LOCKED
), picked AS (
    SELECT id FROM overdue UNION ALL SELECT id FROM ranked
)
UPDATE pulse_jobs j
SET state = 'running', attempt = j.attempt + 1, lease_owner = %(owner)s,
    lease_token = (SELECT gen_random_uuid()), started_at = now(),
    lease_expires_at = now() + make_interval(secs => %(lease_ttl)s::float8),
    max_attempts = COALESCE(j.max_attempts, (%(attempts_by_type)s::jsonb ->> j.type)::int,
                            %(fallback_attempts)s::int)
FROM picked
WHERE j.id = picked.id
RETURNING j.id, j.type, j.queue, j.payload, j.priority, j.attempt, j.max_attempts,
          j.idempotency_key, j.created_at, j.run_at, j.timeout_s, j.lease_token,
          j.started_at

-- name: job_complete_and_claim
-- job_complete_many and job_claim as one statement, its own transaction:
-- what a worker at concurrency 1 sends after each batch. In a pipeline
-- (BEGIN, the two statements, COMMIT) psycopg waits on the socket once
-- per statement: 2.7 ms against 1.0 ms for this (bench/round_trips.py).
-- The claim's CTEs are job_claim's, each scan first reading `done`, so the
-- completion runs before the claim locks anything (a claim's lock on a row
-- another worker is completing, kept to commit by the recheck of a stale
-- snapshot, deadlocked two workers completing after claiming). The rows
-- updated are disjoint: `done` only running rows this worker leases, the
-- claim only available ones. At least one row: `lost` (the ids whose lease
-- did not hold, NULL when all did: repeated in every row, so kept to what
-- is nearly always NULL, not the ids that held), `woken`, then a claimed
-- job's columns (NULL when nothing was claimed). tests/unit/test_complete_and_claim_sql.py keeps
-- its parts equal to job_complete_many's and job_claim's text.
WITH done AS (
    UPDATE pulse_jobs j
    SET state = 'completed', finished_at = now(), lease_token = NULL,
        lease_expires_at = NULL, last_error = NULL, result = c.result::jsonb
    FROM unnest(%(ids)b::bigint[], %(tokens)b::uuid[], %(results)b::text[])
         AS c(id, token, result)
    WHERE j.id = c.id AND j.lease_token = c.token AND j.state::text = 'running'
    RETURNING j.id
), woken AS (
    SELECT pg_notify('pulse_done', d.id::text) FROM done d
    WHERE EXISTS (SELECT 1 FROM pulse_job_waiters)
      AND EXISTS (SELECT 1 FROM pulse_job_waiters w WHERE w.job_id = d.id)
), overdue AS (
    SELECT id FROM pulse_jobs
    WHERE state = 'available' AND %(aging)s::float8 > 0
      AND (SELECT count(*) FROM done) >= 0
      AND run_at < now() - make_interval(secs => %(aging)s::float8)
      AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
      AND (%(handled)s::text[] IS NULL OR type = ANY(%(handled)s::text[]))
      AND type <> ALL(%(limited)s::text[])
      AND queue <> ALL(ARRAY(SELECT queue FROM pulse_paused_queues ORDER BY queue))
    ORDER BY run_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), ranked AS (
    SELECT id FROM pulse_jobs
    WHERE state = 'available'
      AND (SELECT count(*) FROM done) >= 0
      AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
      AND (%(handled)s::text[] IS NULL OR type = ANY(%(handled)s::text[]))
      AND type <> ALL(%(limited)s::text[])
      AND queue <> ALL(ARRAY(SELECT queue FROM pulse_paused_queues ORDER BY queue))
      -- SKIP LOCKED does not skip rows this transaction locked in overdue
      AND id <> ALL(ARRAY(SELECT id FROM overdue))
    ORDER BY priority, run_at, id
    LIMIT %(limit)s - (SELECT count(*) FROM overdue)
    FOR UPDATE SKIP LOCKED
), picked AS (
    SELECT id FROM overdue UNION ALL SELECT id FROM ranked
), claimed AS (
    UPDATE pulse_jobs j
    SET state = 'running', attempt = j.attempt + 1, lease_owner = %(owner)s,
        lease_token = (SELECT gen_random_uuid()), started_at = now(),
        lease_expires_at = now() + make_interval(secs => %(lease_ttl)s::float8),
        max_attempts = COALESCE(j.max_attempts, (%(attempts_by_type)s::jsonb ->> j.type)::int,
                                %(fallback_attempts)s::int)
    FROM picked
    WHERE j.id = picked.id
    RETURNING j.id, j.type, j.queue, j.payload, j.priority, j.attempt, j.max_attempts,
              j.idempotency_key, j.created_at, j.run_at, j.timeout_s, j.lease_token,
              j.started_at
)
SELECT (SELECT array_agg(c.id) FROM unnest(%(ids)b::bigint[]) AS c(id)
        WHERE c.id NOT IN (SELECT id FROM done)) AS lost,
       (SELECT count(*) FROM woken) AS woken, c.*
FROM (SELECT 1) AS one LEFT JOIN claimed c ON true

-- name: job_claim_by_type
-- job_claim for a worker that handles some types while many waiting jobs
-- of other types come first (in priority or age order): job_claim's walk
-- steps over each of those per claim (1,000,000 of them: ~1 s). Here each
-- handled type is its own ordered index scan (type_available_idx, and
-- type_aging_idx for the overdue part, migration 0008) that stops after
-- `limit` rows; the best `limit` of them are kept. Each type's scan locks
-- its rows before the merge sees them, so a claim may lock up to `limit`
-- rows per handled type that has jobs and keep `limit`: the rest are
-- released at commit, a moment later. That cost is why the worker uses this
-- claim only while it sees jobs of types it does not handle waiting.
WITH handled AS (
    SELECT DISTINCT type FROM unnest(%(handled)s::text[]) AS h(type)
    WHERE type <> ALL(%(limited)s::text[])
), paused AS (
    SELECT ARRAY(SELECT queue FROM pulse_paused_queues ORDER BY queue) AS queues
), overdue AS (
    SELECT c.id FROM handled h, paused p, LATERAL (
        SELECT id, run_at FROM pulse_jobs
        WHERE state = 'available' AND type = h.type AND %(aging)s::float8 > 0
          AND run_at < now() - make_interval(secs => %(aging)s::float8)
          AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
          AND queue <> ALL(p.queues)
        ORDER BY run_at, id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) c
    ORDER BY c.run_at, c.id
    LIMIT %(limit)s
), ranked AS (
    SELECT c.id FROM handled h, paused p, LATERAL (
        SELECT id, priority, run_at FROM pulse_jobs
        WHERE state = 'available' AND type = h.type
          AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
          AND queue <> ALL(p.queues)
          AND id <> ALL(ARRAY(SELECT id FROM overdue))
        ORDER BY priority, run_at, id
        LIMIT %(limit)s - (SELECT count(*) FROM overdue)
        FOR UPDATE SKIP LOCKED
    ) c
    ORDER BY c.priority, c.run_at, c.id
    LIMIT %(limit)s - (SELECT count(*) FROM overdue)
), picked AS (
    SELECT id FROM overdue UNION ALL SELECT id FROM ranked
)
UPDATE pulse_jobs j
SET state = 'running', attempt = j.attempt + 1, lease_owner = %(owner)s,
    lease_token = (SELECT gen_random_uuid()), started_at = now(),
    lease_expires_at = now() + make_interval(secs => %(lease_ttl)s::float8),
    max_attempts = COALESCE(j.max_attempts, (%(attempts_by_type)s::jsonb ->> j.type)::int,
                            %(fallback_attempts)s::int)
FROM picked
WHERE j.id = picked.id
RETURNING j.id, j.type, j.queue, j.payload, j.priority, j.attempt, j.max_attempts,
          j.idempotency_key, j.created_at, j.run_at, j.timeout_s, j.lease_token,
          j.started_at

-- name: job_types_waiting
-- The types of available jobs, one index probe per type (a skip scan
-- of type_available_idx written out): a worker compares them with its
-- handlers to choose between job_claim and job_claim_by_type.
WITH RECURSIVE t AS (
    (SELECT type FROM pulse_jobs WHERE state = 'available' ORDER BY type LIMIT 1)
    UNION ALL
    SELECT (SELECT type FROM pulse_jobs WHERE state = 'available' AND type > t.type
            ORDER BY type LIMIT 1)
    FROM t WHERE t.type IS NOT NULL
)
SELECT type FROM t WHERE type IS NOT NULL

-- name: wakeups_listen
-- Workers listen only while idle: every NOTIFY signals every listening
-- backend, and busy workers' backends woken for nothing cost a quarter of
-- the single-row enqueue rate with 8 workers (they claim again anyway).
-- Committed before the claim that precedes a wait (Store.complete_and_claim):
-- a job that claim cannot see yet commits after this and wakes the worker.
LISTEN pulse_jobs

-- name: wakeups_unlisten
UNLISTEN pulse_jobs

-- name: claim_plan_settings
-- Run before the claims, in their transaction: a time-based predicate and
-- statistics that lag a burst of enqueues can make the planner expect few
-- available rows and choose "scan everything, then sort", which costs a
-- full scan per claim on a large backlog. The ordered index scan is always
-- right for a claim, so ask for it. The inflated cost estimates that follow
-- would also trigger JIT compilation (hundreds of ms a claim): no JIT.
SELECT set_config('enable_seqscan', 'off', true), set_config('enable_sort', 'off', true),
       set_config('jit', 'off', true)

-- name: job_claim_limited
-- Claim jobs of the types that have cluster-wide limits (see
-- pulse_claim_limited: migration 0002, as replaced by 0016).
SELECT id, type, queue, payload, priority, attempt, max_attempts, idempotency_key,
       created_at, run_at, timeout_s, lease_token, started_at
FROM pulse_claim_limited(%(owner)s, %(limit)s, %(lease_ttl)s::float8, %(queues)s::text[],
                         %(types)s::text[], %(concurrency)s::int[], %(rate_count)s::int[],
                         %(rate_per)s::float8[], %(default_types)s::text[],
                         %(default_attempts)s::int[])

-- name: types_with_available_jobs
-- Which of these types have jobs waiting (a throttled worker polls sooner).
SELECT t FROM unnest(%(types)s::text[]) AS t
WHERE EXISTS (SELECT 1 FROM pulse_jobs WHERE type = t AND state = 'available')

-- name: queue_pause
INSERT INTO pulse_paused_queues (queue) VALUES (%(queue)s) ON CONFLICT DO NOTHING

-- name: queue_resume
DELETE FROM pulse_paused_queues WHERE queue = %(queue)s

-- name: queues_paused
SELECT queue, paused_at FROM pulse_paused_queues ORDER BY queue

-- name: job_complete_many
-- Finish many jobs in one statement, each with its handler's result (JSON
-- text, NULL for none; a batch without results sends one NULL array, which
-- unnest() pads); returns the ids whose lease still held. Wakes waiters of
-- these jobs (pulse_job_waiters): while nobody waits, the first EXISTS finds
-- the table empty once per statement and no row is probed.
WITH done AS (
    UPDATE pulse_jobs j
    SET state = 'completed', finished_at = now(), lease_token = NULL,
        lease_expires_at = NULL, last_error = NULL, result = c.result::jsonb
    FROM unnest(%(ids)b::bigint[], %(tokens)b::uuid[], %(results)b::text[])
         AS c(id, token, result)
    WHERE j.id = c.id AND j.lease_token = c.token AND j.state::text = 'running'
    RETURNING j.id
), woken AS (
    SELECT pg_notify('pulse_done', d.id::text) FROM done d
    WHERE EXISTS (SELECT 1 FROM pulse_job_waiters)
      AND EXISTS (SELECT 1 FROM pulse_job_waiters w WHERE w.job_id = d.id)
)
SELECT id, (SELECT count(*) FROM woken) AS woken FROM done

-- name: job_record_error
-- End an attempt that raised: retryable after `backoff` seconds while
-- attempts remain and the error is retryable, failed otherwise; the attempt
-- goes to the history. A timeout that makes poison_after worker_died or
-- timeout attempts in a row fails the job (pulse_crash_streak). Returns the
-- job's new state, or no row if the lease was lost.
WITH streak AS (
    SELECT %(outcome)s = 'timeout'
           AND pulse_crash_streak(%(id)s) + 1 >= %(poison_after)s AS poisoned
), ended AS (
    UPDATE pulse_jobs j
    SET state = CASE WHEN %(retry)s AND j.attempt < j.max_attempts AND NOT s.poisoned
                     THEN 'retryable' ELSE 'failed' END::pulse_job_state,
        run_at = CASE WHEN %(retry)s AND j.attempt < j.max_attempts AND NOT s.poisoned
                      THEN now() + make_interval(secs => %(backoff)s::float8) ELSE j.run_at END,
        finished_at = CASE WHEN %(retry)s AND j.attempt < j.max_attempts AND NOT s.poisoned
                           THEN NULL ELSE now() END,
        lease_token = NULL, lease_expires_at = NULL,
        last_error = CASE WHEN s.poisoned THEN %(message)s || '; ' || %(poison_note)s
                          ELSE %(message)s END
    FROM streak s
    WHERE j.id = %(id)s AND j.lease_token = %(token)s AND j.state = 'running'
    RETURNING j.id, j.attempt, j.lease_owner, j.started_at, j.state, s.poisoned
), history AS (
    INSERT INTO pulse_job_attempts (job_id, attempt, worker, started_at, outcome,
                                    error_class, error_message, traceback)
    SELECT id, attempt, lease_owner, started_at, %(outcome)s, %(error_class)s,
           %(message)s, %(traceback)s
    FROM ended
), woken AS (
    SELECT pg_notify('pulse_done', e.id::text) FROM ended e
    WHERE e.state = 'failed' AND EXISTS (SELECT 1 FROM pulse_job_waiters w WHERE w.job_id = e.id)
)
SELECT id, state, poisoned, (SELECT count(*) FROM woken) AS woken FROM ended

-- name: job_snooze
-- Put a running job back for `delay` seconds without using an attempt.
WITH ended AS (
    UPDATE pulse_jobs j
    SET state = CASE WHEN %(delay)s::float8 > 0 THEN 'scheduled'
                     ELSE 'available' END::pulse_job_state,
        run_at = now() + make_interval(secs => %(delay)s::float8),
        attempt = j.attempt - 1, lease_token = NULL, lease_expires_at = NULL
    WHERE j.id = %(id)s AND j.lease_token = %(token)s AND j.state = 'running'
    RETURNING j.id, j.attempt + 1 AS attempt, j.lease_owner, j.started_at, j.state
), history AS (
    INSERT INTO pulse_job_attempts (job_id, attempt, worker, started_at, outcome)
    SELECT id, attempt, lease_owner, started_at, 'snoozed' FROM ended
)
SELECT id, state FROM ended

-- name: job_give_back_owner
-- A dead worker's jobs that it had claimed but not started (the master
-- knows which one was running): available again, the claim's attempt
-- undone, no history row, since they never ran.
UPDATE pulse_jobs j
SET state = 'available', attempt = j.attempt - 1, lease_token = NULL,
    lease_expires_at = NULL
WHERE j.state = 'running' AND j.lease_owner = ANY(%(owners)s::text[])
  AND NOT j.id = ANY(%(started)s::bigint[])
RETURNING j.id, j.state, j.type, j.queue

-- name: job_progress_many
-- Write running jobs' latest progress reports (JSON text), fenced by their
-- leases; returns the ids still held. A report's `at` is the database's
-- now() at the write (at most a keeper tick after the report), not the
-- host's clock, which may be minutes off the run_at and started_at shown
-- beside it.
UPDATE pulse_jobs j
SET progress = jsonb_set(c.progress::jsonb, '{at}', to_jsonb(now()))
FROM unnest(%(ids)b::bigint[], %(tokens)b::uuid[], %(progress)b::text[]) AS c(id, token, progress)
WHERE j.id = c.id AND j.lease_token = c.token AND j.state::text = 'running'
RETURNING j.id

-- name: cancels_listen
-- Every worker listens for cancellations of the jobs it runs (rare: each
-- cancel of a running job signals every worker's backend once).
LISTEN pulse_cancel

-- name: jobs_cancelled_among
-- Behind a transaction pooler with no direct connection to LISTEN on, a
-- worker asks this about its running jobs every poll_interval instead.
SELECT id FROM pulse_jobs WHERE id = ANY(%(ids)s::bigint[]) AND state = 'cancelled'

-- name: job_renew_leases
-- Extend the leases a worker still holds; returns the ids still held.
UPDATE pulse_jobs j
SET lease_expires_at = now() + make_interval(secs => %(lease_ttl)s::float8)
FROM unnest(%(ids)b::bigint[], %(tokens)b::uuid[]) AS c(id, token)
WHERE j.id = c.id AND j.lease_token = c.token AND j.state::text = 'running'
RETURNING j.id

-- name: job_release_owner
-- Release every lease held by owners that are gone (a worker the master saw
-- die, or a previous incarnation of this node), or only `job_ids` of them;
-- the attempt is recorded with how its worker ended. `interrupted` (an
-- operator's stop, or a sibling's hard kill) gives the attempt back and the
-- job is available at once. Any other outcome uses the attempt: retryable
-- after the backoff while attempts remain, failed otherwise, and failed at
-- once when it makes poison_after worker_died or timeout attempts in a row.
WITH gone AS (
    SELECT j.id, j.attempt >= j.max_attempts AS exhausted,
           %(outcome)s IN ('worker_died', 'timeout')
           AND pulse_crash_streak(j.id) + 1 >= %(poison_after)s AS poisoned
    FROM pulse_jobs j
    WHERE j.state = 'running'
      AND (j.lease_owner = ANY(%(owners)s::text[])
           OR (%(owner_prefix)s::text IS NOT NULL
               AND starts_with(j.lease_owner, %(owner_prefix)s::text)
               AND NOT j.lease_owner = ANY(%(keep_owners)s::text[])))
      AND (%(job_ids)s::bigint[] IS NULL OR j.id = ANY(%(job_ids)s::bigint[]))
    FOR UPDATE
), ended AS (
    UPDATE pulse_jobs j
    SET state = CASE WHEN %(outcome)s = 'interrupted' THEN 'available'
                     WHEN g.exhausted OR g.poisoned THEN 'failed'
                     ELSE 'retryable' END::pulse_job_state,
        attempt = CASE WHEN %(outcome)s = 'interrupted' THEN j.attempt - 1 ELSE j.attempt END,
        run_at = CASE WHEN %(outcome)s = 'interrupted' THEN now()
                      ELSE pulse_retry_at(j.attempt, %(backoff_base)s, %(backoff_cap)s,
                                          %(backoff_jitter)s) END,
        finished_at = CASE WHEN %(outcome)s <> 'interrupted' AND (g.exhausted OR g.poisoned)
                           THEN now() END,
        lease_token = NULL, lease_expires_at = NULL,
        last_error = CASE WHEN g.poisoned THEN %(message)s || '; ' || %(poison_note)s
                          ELSE %(message)s END
    FROM gone g
    WHERE j.id = g.id
    RETURNING j.id, CASE WHEN %(outcome)s = 'interrupted' THEN j.attempt + 1
                         ELSE j.attempt END AS attempt,
              j.lease_owner, j.started_at, j.state, j.type, j.queue, g.poisoned
), history AS (
    INSERT INTO pulse_job_attempts (job_id, attempt, worker, started_at, outcome,
                                    error_class, error_message)
    SELECT id, attempt, lease_owner, started_at, %(outcome)s, %(error_class)s, %(message)s
    FROM ended
)
SELECT id, state, type, queue, poisoned FROM ended

-- name: job_reap_expired
-- Take back leases that expired (their worker's host vanished, or it hung):
-- retryable after the backoff when attempts remain, failed otherwise. Fenced by the
-- leader term when one is given: a deposed leader reaps nothing. The fence
-- row is share-locked, so a takeover waits for this statement to finish.
WITH fence AS (
    SELECT 1 FROM pulse_leader
    WHERE name = %(leader_name)s AND leader_id = %(leader_id)s AND term = %(term)s
      AND expires_at > now()
    FOR SHARE
), ended AS (
    UPDATE pulse_jobs j
    SET state = CASE WHEN j.attempt < j.max_attempts
                     THEN 'retryable' ELSE 'failed' END::pulse_job_state,
        run_at = pulse_retry_at(j.attempt, %(backoff_base)s, %(backoff_cap)s, %(backoff_jitter)s),
        finished_at = CASE WHEN j.attempt < j.max_attempts THEN NULL ELSE now() END,
        lease_token = NULL, lease_expires_at = NULL,
        last_error = 'lease expired (worker ' || coalesce(j.lease_owner, '?') || ' stopped renewing it)'
    WHERE j.id IN (
        SELECT id FROM pulse_jobs
        WHERE state = 'running'
          AND lease_expires_at < COALESCE(%(now)s::timestamptz, now())
        ORDER BY lease_expires_at
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
      AND (%(term)s::bigint IS NULL OR EXISTS (SELECT 1 FROM fence))
    RETURNING j.id, j.attempt, j.lease_owner, j.started_at, j.state, j.queue
), history AS (
    INSERT INTO pulse_job_attempts (job_id, attempt, worker, started_at, outcome,
                                    error_class, error_message)
    SELECT id, attempt, lease_owner, started_at, 'lease_expired', 'LeaseExpired',
           'lease expired before the worker finished'
    FROM ended
)
SELECT id, state, queue FROM ended

-- name: jobs_dead_rows
-- Dead and live row versions of the jobs table (cumulative statistics, no
-- scan), for the vacuumer.
SELECT n_dead_tup, n_live_tup FROM pg_stat_user_tables WHERE relid = 'pulse_jobs'::regclass

-- name: jobs_may_vacuum
-- VACUUM by anyone but the owner (or a superuser) only warns and skips.
SELECT pg_has_role(c.relowner, 'USAGE') FROM pg_class c WHERE c.oid = 'pulse_jobs'::regclass

-- name: jobs_vacuum
-- Remove dead row versions and their index entries (see maintenance/vacuumer.py).
-- No truncation of empty pages at the end: it takes an exclusive table lock.
VACUUM (INDEX_CLEANUP ON, TRUNCATE OFF) pulse_jobs

-- name: job_promote_due
-- Make due scheduled and retryable jobs available. Fenced like the reaper.
WITH fence AS (
    SELECT 1 FROM pulse_leader
    WHERE name = %(leader_name)s AND leader_id = %(leader_id)s AND term = %(term)s
      AND expires_at > now()
    FOR SHARE
)
UPDATE pulse_jobs j
SET state = 'available'
WHERE j.id IN (
    SELECT id FROM pulse_jobs
    WHERE state IN ('scheduled', 'retryable')
      AND run_at <= COALESCE(%(now)s::timestamptz, now())
    ORDER BY run_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED)
  AND (%(term)s::bigint IS NULL OR EXISTS (SELECT 1 FROM fence))
RETURNING j.id, j.queue

-- name: job_prune_finished
-- Delete finished jobs (and, by cascade, their attempts) past their
-- retention, a batch at a time. Frees their idempotency keys. Fenced.
-- Returns only how many: a batch's ids (~200 KB) could fill the socket
-- buffers of a leader frozen mid-reply, and the statement, still sending,
-- would keep the lease row share-locked (no timeout ends a statement
-- blocked on its client) and every follower from taking over.
WITH fence AS (
    SELECT 1 FROM pulse_leader
    WHERE name = %(leader_name)s AND leader_id = %(leader_id)s AND term = %(term)s
      AND expires_at > now()
    FOR SHARE
), deleted AS (
    DELETE FROM pulse_jobs
    WHERE id IN (
        SELECT id FROM pulse_jobs
        WHERE state = %(state)s::pulse_job_state
          AND finished_at < COALESCE(%(now)s::timestamptz, now())
                            - make_interval(secs => %(retention)s::float8)
          -- a unique_for key is held for its whole period, finished or not
          AND (unique_until IS NULL OR unique_until <= COALESCE(%(now)s::timestamptz, now()))
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
      AND (%(term)s::bigint IS NULL OR EXISTS (SELECT 1 FROM fence))
    RETURNING id
)
SELECT count(*) AS deleted FROM deleted

-- name: cron_tick_claim
-- Record that a cron entry's tick is being enqueued; no row when another
-- leader already did it (the primary key) or this one is deposed (fence).
WITH fence AS (
    SELECT 1 FROM pulse_leader
    WHERE name = %(leader_name)s AND leader_id = %(leader_id)s AND term = %(term)s
      AND expires_at > now()
    FOR SHARE
)
INSERT INTO pulse_cron_ticks (name, tick)
SELECT %(name)s, %(tick)s FROM fence
ON CONFLICT DO NOTHING
RETURNING name

-- name: cron_tick_set_job
UPDATE pulse_cron_ticks SET job_id = %(job_id)s WHERE name = %(name)s AND tick = %(tick)s

-- name: db_now
-- The database server's clock: the one clock for shared state (cron ticks),
-- whatever the host's wall clock says.
SELECT now()

-- name: cron_last_tick
SELECT max(tick) FROM pulse_cron_ticks WHERE name = %(name)s

-- name: cron_ticks_prune
-- Forget ticks older than the horizon, keeping each entry's latest. Fenced.
WITH fence AS (
    SELECT 1 FROM pulse_leader
    WHERE name = %(leader_name)s AND leader_id = %(leader_id)s AND term = %(term)s
      AND expires_at > now()
    FOR SHARE
)
DELETE FROM pulse_cron_ticks t
WHERE t.tick < now() - make_interval(secs => %(horizon)s::float8)
  AND t.tick < (SELECT max(tick) FROM pulse_cron_ticks l WHERE l.name = t.name)
  AND EXISTS (SELECT 1 FROM fence)

-- name: process_heartbeat_many
-- Register (or refresh) this node's processes in one statement. A row is a
-- process: during a reload the old and the new worker 1 are two rows.
-- DISTINCT ON: a key proposed twice would fail the whole statement.
INSERT INTO pulse_processes (node_id, role, idx, pid, heartbeat_at, info)
SELECT DISTINCT ON (r.role, r.idx, r.pid) %(node_id)s, r.role, r.idx, r.pid, now(), r.info
FROM unnest(%(roles)s::text[], %(idxs)s::int[], %(pids)s::int[], %(infos)s::jsonb[])
     AS r(role, idx, pid, info)
ON CONFLICT (node_id, role, idx, pid) DO UPDATE
SET heartbeat_at = now(), info = EXCLUDED.info

-- name: process_forget_others
-- Drop this node's rows for processes it no longer runs (exited, scaled away).
DELETE FROM pulse_processes
WHERE node_id = %(node_id)s
  AND (role, idx, pid) NOT IN (
      SELECT * FROM unnest(%(roles)s::text[], %(idxs)s::int[], %(pids)s::int[]))

-- name: worker_types_register
-- A worker's handled types (at start, and again with each look at the
-- types waiting, so a row dropped while its node seemed dead comes back).
INSERT INTO pulse_worker_types (node_id, pid, types) VALUES (%(node_id)s, %(pid)s, %(types)s)
ON CONFLICT (node_id, pid) DO UPDATE SET types = EXCLUDED.types, registered_at = now()

-- name: worker_types_forget_unlisted
-- Drop the handled types of processes the registry no longer lists (any
-- node's: a dead node's rows go once the leader prunes its processes). A
-- new worker is listed at its node's next registry heartbeat: its row is
-- kept for `grace` seconds before that.
DELETE FROM pulse_worker_types w
WHERE w.registered_at < now() - make_interval(secs => %(grace)s::float8)
  AND NOT EXISTS (SELECT 1 FROM pulse_processes p
                  WHERE p.node_id = w.node_id AND p.pid = w.pid AND p.role = 'worker')

-- name: types_handled_live
-- The types some live worker (registry heartbeat within `max_age`) handles.
SELECT DISTINCT t.type
FROM pulse_worker_types w
JOIN pulse_processes p ON p.node_id = w.node_id AND p.pid = w.pid AND p.role = 'worker'
CROSS JOIN unnest(w.types) AS t(type)
WHERE p.heartbeat_at > now() - make_interval(secs => %(max_age)s::float8)

-- name: process_forget_node
DELETE FROM pulse_processes WHERE node_id = %(node_id)s

-- name: process_prune_dead
-- Forget nodes whose processes stopped heartbeating. Fenced.
WITH fence AS (
    SELECT 1 FROM pulse_leader
    WHERE name = %(leader_name)s AND leader_id = %(leader_id)s AND term = %(term)s
      AND expires_at > now()
    FOR SHARE
)
DELETE FROM pulse_processes
WHERE heartbeat_at < now() - make_interval(secs => %(max_age)s::float8)
  AND (%(term)s::bigint IS NULL OR EXISTS (SELECT 1 FROM fence))
RETURNING node_id, role, idx

-- name: nodes_alive
SELECT node_id, count(*) AS processes, max(heartbeat_at) AS heartbeat_at
FROM pulse_processes
WHERE heartbeat_at > now() - make_interval(secs => %(max_age)s::float8)
GROUP BY node_id ORDER BY node_id

-- name: job_cancel
-- Cancel a job that has not finished. A running job's lease is cleared, so
-- its worker's later writes change nothing; its attempt is recorded.
WITH old AS (
    SELECT id, state FROM pulse_jobs
    WHERE id = %(id)s AND state NOT IN ('completed', 'failed', 'cancelled')
    FOR UPDATE
), ended AS (
    UPDATE pulse_jobs j
    SET state = 'cancelled', finished_at = now(), lease_token = NULL,
        lease_expires_at = NULL
    FROM old WHERE j.id = old.id
    RETURNING j.id, j.attempt, j.lease_owner, j.started_at, old.state AS old_state
), history AS (
    INSERT INTO pulse_job_attempts (job_id, attempt, worker, started_at, outcome, error_message)
    SELECT id, attempt, lease_owner, started_at, 'cancelled', 'cancelled while running'
    FROM ended WHERE old_state = 'running'
), woken AS (
    SELECT pg_notify('pulse_done', e.id::text) FROM ended e
    WHERE EXISTS (SELECT 1 FROM pulse_job_waiters w WHERE w.job_id = e.id)
), told AS (
    -- Its worker hears this (every worker LISTENs on pulse_cancel) and
    -- sets job.cancelled; its later writes are fenced out already.
    SELECT pg_notify('pulse_cancel', e.id::text) FROM ended e WHERE e.old_state = 'running'
)
SELECT id, (SELECT count(*) FROM woken) + (SELECT count(*) FROM told) AS woken FROM ended

-- name: job_retry
-- Run a finished, failed, cancelled or waiting job again now. A job out of
-- attempts gets one more. A completed job's final attempt lived in the job
-- row; it goes to the history first so the rerun does not erase it. A
-- finished unique_while job whose key another job holds now runs without
-- it (its key released): the unique index allows one holder.
WITH old AS (
    SELECT id, state, attempt, lease_owner, started_at, finished_at FROM pulse_jobs
    WHERE id = %(id)s AND state IN ('completed', 'failed', 'cancelled', 'retryable', 'scheduled')
    FOR UPDATE
), history AS (
    INSERT INTO pulse_job_attempts (job_id, attempt, worker, started_at, finished_at, outcome)
    SELECT id, attempt, lease_owner, started_at, finished_at, 'completed'
    FROM old WHERE state = 'completed'
)
UPDATE pulse_jobs j
SET state = 'available', run_at = now(), finished_at = NULL,
    max_attempts = CASE WHEN j.max_attempts IS NOT NULL
                        THEN GREATEST(j.max_attempts, j.attempt + 1) END,
    key_released_at = CASE WHEN j.unique_while IS NOT NULL AND j.key_released_at IS NULL
                           AND EXISTS (SELECT 1 FROM pulse_jobs h
                                       WHERE h.idempotency_key = j.idempotency_key
                                         AND h.id <> j.id AND h.key_released_at IS NULL
                                         AND (h.unique_while IS NULL OR h.state NOT IN
                                              ('completed', 'failed', 'cancelled')))
                           THEN statement_timestamp() ELSE j.key_released_at END
FROM old WHERE j.id = old.id
RETURNING j.id, j.queue

-- name: job_get
SELECT id, type, queue, state, priority, attempt, max_attempts, payload, run_at,
       created_at, started_at, finished_at, idempotency_key, last_error, lease_owner, result,
       progress, unique_while, unique_until, key_released_at
FROM pulse_jobs WHERE id = %(id)s

-- name: jobs_get_by_ids
-- job_get for many jobs at once: the HTTP API answers each request of a
-- group of enqueues (pulsed/http/enqueue_group.py) with its job's row.
SELECT id, type, queue, state, priority, attempt, max_attempts, payload, run_at,
       created_at, started_at, finished_at, idempotency_key, last_error, lease_owner, result,
       progress, unique_while, unique_until, key_released_at
FROM pulse_jobs WHERE id = ANY(%(ids)s::bigint[])

-- name: job_waiter_add
-- pulsed.wait: be told (NOTIFY pulse_done, payload the id) when this job
-- finishes. Committed before the job's state is read, so an end committed
-- after that read sends the notification.
INSERT INTO pulse_job_waiters (job_id) SELECT id FROM pulse_jobs WHERE id = %(job_id)s
RETURNING id

-- name: job_waiter_remove
DELETE FROM pulse_job_waiters WHERE id = %(id)s

-- name: jobs_ended_among
-- Of the jobs long polls wait for (GET /jobs/{id}?wait=), those finished
-- or gone: the safety net for ends that send no NOTIFY (a job failed by the
-- master or the reaper), one query for all the API's waiters.
SELECT w.id FROM unnest(%(ids)s::bigint[]) AS w(id)
WHERE NOT EXISTS (SELECT 1 FROM pulse_jobs j
                  WHERE j.id = w.id AND j.state NOT IN ('completed', 'failed', 'cancelled'))

-- name: jobs_done_listen
LISTEN pulse_done

-- name: jobs_done_unlisten
UNLISTEN pulse_done

-- name: job_attempts
SELECT attempt, worker, started_at, finished_at, outcome, error_class,
       error_message, traceback
FROM pulse_job_attempts WHERE job_id = %(id)s ORDER BY id

-- name: job_list
-- Newest first, keyset-paginated by id (`after`: show ids below it). The
-- page ends where the payloads and results before a row reach `max_bytes`
-- of JSON text: that row and those after it come without them, and the
-- caller stops before them (1,000 jobs of 1 MiB payloads made one answer of
-- a gigabyte, held in the API child). The first row always comes whole.
SELECT id, type, queue, state, priority, attempt, max_attempts,
       CASE WHEN bytes_before < %(max_bytes)s THEN payload END AS payload, run_at,
       created_at, started_at, finished_at, idempotency_key, last_error, lease_owner,
       CASE WHEN bytes_before < %(max_bytes)s THEN result END AS result,
       progress, unique_while, unique_until, key_released_at, bytes_before
FROM (
    SELECT id, type, queue, state, priority, attempt, max_attempts, payload, run_at,
           created_at, started_at, finished_at, idempotency_key, last_error, lease_owner,
           result, progress, unique_while, unique_until, key_released_at,
           coalesce(sum(octet_length(payload::text) + coalesce(octet_length(result::text), 0))
                    OVER (ORDER BY id DESC ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
                    0) AS bytes_before
    FROM pulse_jobs
    WHERE (%(state)s::pulse_job_state IS NULL OR state = %(state)s::pulse_job_state)
      AND (%(type)s::text IS NULL OR type = %(type)s::text)
      AND (%(after)s::bigint IS NULL OR id < %(after)s::bigint)
    ORDER BY id DESC
    LIMIT %(limit)s
) page
ORDER BY id DESC

-- name: queue_ages
-- Per type and state of unfinished jobs (and failed ones kept for
-- inspection), for status and metrics: how many, and the age in seconds of
-- the oldest one: available since it was due, running since it started,
-- others since created. Completed and cancelled jobs are history and left
-- out. Each state is read from a partial index that holds only its rows and
-- the time needed (available: type_available_idx; running: the lease index;
-- the rest: type_waiting_idx), so the cost follows the unfinished jobs, not
-- the table (migration 0004 says why). An infinite timestamp (written by
-- SQL directly) has no age: NULL, since subtracting it is an error.
SELECT type, state, count,
       CASE WHEN isfinite(oldest) THEN EXTRACT(EPOCH FROM now() - oldest)::float8 END
           AS oldest_age_s FROM (
    SELECT type, 'available' AS state, count(*) AS count, min(run_at) AS oldest
    FROM pulse_jobs WHERE state = 'available' GROUP BY type
    UNION ALL
    SELECT type, 'running', count(*), min(started_at)
    FROM pulse_jobs WHERE state = 'running' GROUP BY type
    UNION ALL
    SELECT type, state::text, count(*), min(created_at)
    FROM pulse_jobs WHERE state IN ('scheduled', 'retryable', 'failed') GROUP BY type, state
) ages
ORDER BY type, state

-- name: jobs_running_progress
-- The progress of jobs running on a node (for its status: pulsectl top,
-- the page). From the lease index: only running rows are read.
SELECT id, progress FROM pulse_jobs
WHERE state = 'running' AND progress IS NOT NULL
  AND starts_with(lease_owner, %(owner_prefix)s::text)
LIMIT %(limit)s

-- name: oldest_available_age
-- NULL when nothing waits, or the oldest run_at is infinite (see queue_ages).
SELECT CASE WHEN isfinite(min(run_at)) THEN EXTRACT(EPOCH FROM now() - min(run_at))::float8 END
FROM pulse_jobs WHERE state = 'available'

-- name: connection_usage
-- The server's client connections: Pulse's (every Pulse connection names
-- its role in application_name, "pulse ..."), everyone's, and the limit
-- less the slots kept for superusers. Without pg_read_all_stats, other
-- users' sessions show no application_name: they count as others.
SELECT count(*) FILTER (WHERE application_name LIKE 'pulse%%') AS pulse,
       count(*) AS total,
       current_setting('max_connections')::int
         - current_setting('superuser_reserved_connections')::int AS available
FROM pg_stat_activity WHERE backend_type = 'client backend'

-- name: leader_attempt_elect
-- Take the lease if it is free or expired; the term grows by one on every
-- change of holder. Returns the new term, or no row if someone holds it.
-- Never waits for the row's lock: a lock on it means a holder is at work
-- (every fenced write share-locks the row), maybe frozen inside a
-- transaction, which the server ends after the scheduler's
-- idle_in_transaction_session_timeout. Waiting behind such a leader (as
-- INSERT ... ON CONFLICT DO UPDATE did) stopped every election for 45 s;
-- skipped, the row is tried again at the next round.
WITH expired AS (
    SELECT name FROM pulse_leader
    WHERE name = %(name)s AND expires_at < now()
    FOR UPDATE SKIP LOCKED
), taken AS (
    UPDATE pulse_leader l
    SET leader_id = %(leader_id)s, term = l.term + 1, elected_at = now(),
        expires_at = now() + make_interval(secs => %(ttl)s::float8)
    FROM expired WHERE l.name = expired.name
    RETURNING l.term
), created AS (
    INSERT INTO pulse_leader (name, leader_id, term, expires_at)
    SELECT %(name)s, %(leader_id)s, 1, now() + make_interval(secs => %(ttl)s::float8)
    WHERE NOT EXISTS (SELECT 1 FROM pulse_leader WHERE name = %(name)s)
    ON CONFLICT (name) DO NOTHING
    RETURNING term
)
SELECT term FROM taken UNION ALL SELECT term FROM created

-- name: leader_attempt_reelect
-- Extend the lease only while still its holder with the same term.
UPDATE pulse_leader
SET expires_at = now() + make_interval(secs => %(ttl)s::float8)
WHERE name = %(name)s AND leader_id = %(leader_id)s AND term = %(term)s
RETURNING term

-- name: leader_resign
-- Give the lease up on a clean stop so another node takes over at once.
UPDATE pulse_leader SET expires_at = now() - interval '1 second'
WHERE name = %(name)s AND leader_id = %(leader_id)s AND term = %(term)s

-- name: leader_get
SELECT leader_id, term, expires_at > now() AS live FROM pulse_leader WHERE name = %(name)s

-- name: job_give_back
-- Return prefetched jobs a worker has not started (it is stopping, or a long
-- job holds it up): available again, the attempt the claim counted undone.
UPDATE pulse_jobs j
SET state = 'available', attempt = j.attempt - 1, lease_token = NULL,
    lease_expires_at = NULL
FROM unnest(%(ids)b::bigint[], %(tokens)b::uuid[]) AS c(id, token)
WHERE j.id = c.id AND j.lease_token = c.token AND j.state::text = 'running'
RETURNING j.id, j.queue

-- name: node_instance_get
-- Who holds a node id (locked: the caller decides, then claims, in one
-- transaction, so two daemons starting at once cannot both win).
SELECT node_id, instance, host, master_pid, started_at,
       extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age_s
FROM pulse_node_instances WHERE node_id = %(node_id)s
FOR UPDATE

-- name: node_instance_claim
-- Hold a node id for this master start (insert, or take over a row the
-- caller found dead).
INSERT INTO pulse_node_instances (node_id, instance, host, master_pid)
VALUES (%(node_id)s, %(instance)s, %(host)s, %(master_pid)s)
ON CONFLICT (node_id) DO UPDATE
SET instance = EXCLUDED.instance, host = EXCLUDED.host, master_pid = EXCLUDED.master_pid,
    started_at = now(), heartbeat_at = now()

-- name: node_instance_heartbeat
-- The scheduler, for its master's start; no row when another start took
-- the node id over (this daemon was presumed dead).
UPDATE pulse_node_instances SET heartbeat_at = now()
WHERE node_id = %(node_id)s AND instance = %(instance)s
RETURNING node_id

-- name: node_instance_release
-- A clean stop: the next start on this node id needs no check.
DELETE FROM pulse_node_instances WHERE node_id = %(node_id)s AND instance = %(instance)s

-- name: job_owners_running
-- The owners of running leases whose name starts with a prefix (a previous
-- master's workers on this node): the master checks which are gone.
SELECT DISTINCT lease_owner FROM pulse_jobs
WHERE state = 'running' AND starts_with(lease_owner, %(owner_prefix)s::text)

-- =============================================================================
-- The operator's console (issue 19): the job browser, bulk actions and the
-- charts' rollup. Used by pulsed/db/browse.py and pulsed/maintenance/rollup.py.
-- Filters: NULL means "any". Executed unprepared (prepare=False) so that each
-- run is planned with its values: the unused filters fold away and the
-- planner picks the index the used ones allow (see docs/console.md).
-- The error search is `error_like`, an ILIKE pattern matching the user's
-- text anywhere, its wildcards escaped: migration 0014's trigram index
-- serves it. A text without three letters or digits in a row has no
-- trigram to look up (the index would read all of itself), so it comes as
-- `error_text` instead, a plain substring test (browse.error_params).
-- =============================================================================

-- name: browse_list
-- A page of jobs, newest first, keyset-paginated by id (`after`: ids below).
SELECT id, type, queue, state, priority, attempt, max_attempts, run_at, created_at,
       started_at, finished_at, last_error, lease_owner, lease_expires_at
FROM pulse_jobs
WHERE (%(state)s::pulse_job_state IS NULL OR state = %(state)s::pulse_job_state)
  AND (%(type)s::text IS NULL OR type = %(type)s::text)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
  AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s::timestamptz)
  AND (%(error_like)s::text IS NULL OR last_error ILIKE %(error_like)s::text)
  AND (%(error_text)s::text IS NULL OR strpos(lower(last_error), lower(%(error_text)s::text)) > 0)
  AND (%(after)s::bigint IS NULL OR id < %(after)s::bigint)
ORDER BY id DESC
LIMIT %(limit)s

-- name: browse_list_finished
-- A page of finished jobs of one state (completed, failed or cancelled),
-- the most recently finished first, keyset-paginated by (finished_at, id).
-- Read from the retention index (pulse_jobs_finished_idx) backwards: by id,
-- the newest ids are often jobs still waiting, and a page of completed ones
-- would first skip every one of them (100,000 took 20-150 ms).
SELECT id, type, queue, state, priority, attempt, max_attempts, run_at, created_at,
       started_at, finished_at, last_error, lease_owner, lease_expires_at
FROM pulse_jobs
WHERE state = %(state)s::pulse_job_state AND state IN ('completed', 'failed', 'cancelled')
  AND (%(type)s::text IS NULL OR type = %(type)s::text)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
  AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s::timestamptz)
  AND (%(error_like)s::text IS NULL OR last_error ILIKE %(error_like)s::text)
  AND (%(error_text)s::text IS NULL OR strpos(lower(last_error), lower(%(error_text)s::text)) > 0)
  AND (%(after_at)s::timestamptz IS NULL
       OR (finished_at, id) < (%(after_at)s::timestamptz, %(after)s::bigint))
ORDER BY finished_at DESC, id DESC
LIMIT %(limit)s

-- name: browse_count
-- How many jobs match, counted up to `cap` (the browser shows "cap+"): an
-- exact count of millions of rows takes seconds.
SELECT count(*) AS count FROM (
    SELECT 1 FROM pulse_jobs
    WHERE (%(state)s::pulse_job_state IS NULL OR state = %(state)s::pulse_job_state)
      AND (%(type)s::text IS NULL OR type = %(type)s::text)
      AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
      AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
      AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s::timestamptz)
      AND (%(error_like)s::text IS NULL OR last_error ILIKE %(error_like)s::text)
      AND (%(error_text)s::text IS NULL OR strpos(lower(last_error), lower(%(error_text)s::text)) > 0)
    LIMIT %(cap)s
) matching

-- name: browse_count_error
-- browse_count for an error search in a waiting or running state, counting
-- the newest matches first: for a text in many errors the planner then
-- walks an index and stops at `cap`, where unordered it may AND a bitmap of
-- every job in the state with one of every match (tens of ms each on
-- 250,000). A rare text still goes by the trigram index. (Without a state,
-- browse_count's unordered scan stops at the cap soonest.)
SELECT count(*) AS count FROM (
    SELECT 1 FROM pulse_jobs
    WHERE (%(state)s::pulse_job_state IS NULL OR state = %(state)s::pulse_job_state)
      AND (%(type)s::text IS NULL OR type = %(type)s::text)
      AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
      AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
      AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s::timestamptz)
      AND (%(error_like)s::text IS NULL OR last_error ILIKE %(error_like)s::text)
      AND (%(error_text)s::text IS NULL OR strpos(lower(last_error), lower(%(error_text)s::text)) > 0)
    ORDER BY id DESC LIMIT %(cap)s
) matching

-- name: browse_count_error_finished
-- The same for a finished state, in its pages' order (the retention index
-- by finish time backwards, past no waiting job): measured 90-145 ms
-- unordered (two bitmaps ANDed) and 33-50 ms by id (past the 100,000
-- newer waiting jobs) for a text in all 250,000 failed jobs' errors.
SELECT count(*) AS count FROM (
    SELECT 1 FROM pulse_jobs
    WHERE state = %(state)s::pulse_job_state AND state IN ('completed', 'failed', 'cancelled')
      AND (%(type)s::text IS NULL OR type = %(type)s::text)
      AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
      AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
      AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s::timestamptz)
      AND (%(error_like)s::text IS NULL OR last_error ILIKE %(error_like)s::text)
      AND (%(error_text)s::text IS NULL OR strpos(lower(last_error), lower(%(error_text)s::text)) > 0)
    ORDER BY finished_at DESC LIMIT %(cap)s
) matching

-- name: bulk_count
-- The exact number of jobs a bulk action would change (shown, confirmed first).
SELECT count(*) AS count FROM pulse_jobs
WHERE state = ANY(%(states)s::pulse_job_state[])
  AND (%(id)s::bigint IS NULL OR id = %(id)s::bigint)
  AND (%(type)s::text IS NULL OR type = %(type)s::text)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(older_than)s::float8 IS NULL
       OR COALESCE(finished_at, created_at) < now() - make_interval(secs => %(older_than)s::float8))
  AND (%(error_like)s::text IS NULL OR last_error ILIKE %(error_like)s::text)
  AND (%(error_text)s::text IS NULL OR strpos(lower(last_error), lower(%(error_text)s::text)) > 0)

-- name: bulk_cancel_batch
-- Cancel one batch of matching jobs (ids below `below`, newest first),
-- exactly as job_cancel does one. SKIP LOCKED: a job a worker is writing
-- right now is left out, never waited for; the batch's transaction is short.
WITH old AS (
    SELECT id, state FROM pulse_jobs
    WHERE state = ANY(%(states)s::pulse_job_state[])
      AND (%(id)s::bigint IS NULL OR id = %(id)s::bigint)
      AND (%(type)s::text IS NULL OR type = %(type)s::text)
      AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
      AND (%(older_than)s::float8 IS NULL
           OR COALESCE(finished_at, created_at) < now() - make_interval(secs => %(older_than)s::float8))
      AND (%(error_like)s::text IS NULL OR last_error ILIKE %(error_like)s::text)
      AND (%(error_text)s::text IS NULL OR strpos(lower(last_error), lower(%(error_text)s::text)) > 0)
      AND (%(below)s::bigint IS NULL OR id < %(below)s::bigint)
    ORDER BY id DESC LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
), ended AS (
    UPDATE pulse_jobs j
    SET state = 'cancelled', finished_at = now(), lease_token = NULL,
        lease_expires_at = NULL
    FROM old WHERE j.id = old.id
    RETURNING j.id, j.attempt, j.lease_owner, j.started_at, old.state AS old_state
), history AS (
    INSERT INTO pulse_job_attempts (job_id, attempt, worker, started_at, outcome, error_message)
    SELECT id, attempt, lease_owner, started_at, 'cancelled', 'cancelled while running'
    FROM ended WHERE old_state = 'running'
), woken AS (
    SELECT pg_notify('pulse_done', e.id::text) FROM ended e
    WHERE EXISTS (SELECT 1 FROM pulse_job_waiters w WHERE w.job_id = e.id)
), told AS (
    SELECT pg_notify('pulse_cancel', e.id::text) FROM ended e WHERE e.old_state = 'running'
)
SELECT (SELECT count(*) FROM old) AS selected, (SELECT count(*) FROM ended) AS changed,
       (SELECT min(id) FROM old) AS last_id,
       (SELECT count(*) FROM woken) + (SELECT count(*) FROM told) AS woken,
       ARRAY[]::text[] AS queues

-- name: bulk_retry_batch
-- Retry one batch of matching jobs, exactly as job_retry does one.
WITH old AS (
    SELECT id, state, attempt, lease_owner, started_at, finished_at FROM pulse_jobs
    WHERE state = ANY(%(states)s::pulse_job_state[])
      AND (%(id)s::bigint IS NULL OR id = %(id)s::bigint)
      AND (%(type)s::text IS NULL OR type = %(type)s::text)
      AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
      AND (%(older_than)s::float8 IS NULL
           OR COALESCE(finished_at, created_at) < now() - make_interval(secs => %(older_than)s::float8))
      AND (%(error_like)s::text IS NULL OR last_error ILIKE %(error_like)s::text)
      AND (%(error_text)s::text IS NULL OR strpos(lower(last_error), lower(%(error_text)s::text)) > 0)
      AND (%(below)s::bigint IS NULL OR id < %(below)s::bigint)
    ORDER BY id DESC LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
), history AS (
    INSERT INTO pulse_job_attempts (job_id, attempt, worker, started_at, finished_at, outcome)
    SELECT id, attempt, lease_owner, started_at, finished_at, 'completed'
    FROM old WHERE state = 'completed'
), retried AS (
    UPDATE pulse_jobs j
    SET state = 'available', run_at = now(), finished_at = NULL,
        max_attempts = CASE WHEN j.max_attempts IS NOT NULL
                            THEN GREATEST(j.max_attempts, j.attempt + 1) END,
        key_released_at = CASE WHEN j.unique_while IS NOT NULL AND j.key_released_at IS NULL
                               AND EXISTS (SELECT 1 FROM pulse_jobs h
                                           WHERE h.idempotency_key = j.idempotency_key
                                             AND h.id <> j.id AND h.key_released_at IS NULL
                                             AND (h.unique_while IS NULL OR h.state NOT IN
                                                  ('completed', 'failed', 'cancelled')))
                               THEN statement_timestamp() ELSE j.key_released_at END
    FROM old WHERE j.id = old.id
    RETURNING j.id, j.queue
)
SELECT (SELECT count(*) FROM old) AS selected, (SELECT count(*) FROM retried) AS changed,
       (SELECT min(id) FROM old) AS last_id, 0 AS woken,
       ARRAY(SELECT DISTINCT queue FROM retried) AS queues

-- name: bulk_delete_batch
-- Delete one batch of matching jobs (their attempts go with them); anyone
-- waiting on one is woken and finds it gone.
WITH old AS (
    SELECT id FROM pulse_jobs
    WHERE state = ANY(%(states)s::pulse_job_state[])
      AND (%(id)s::bigint IS NULL OR id = %(id)s::bigint)
      AND (%(type)s::text IS NULL OR type = %(type)s::text)
      AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
      AND (%(older_than)s::float8 IS NULL
           OR COALESCE(finished_at, created_at) < now() - make_interval(secs => %(older_than)s::float8))
      AND (%(error_like)s::text IS NULL OR last_error ILIKE %(error_like)s::text)
      AND (%(error_text)s::text IS NULL OR strpos(lower(last_error), lower(%(error_text)s::text)) > 0)
      AND (%(below)s::bigint IS NULL OR id < %(below)s::bigint)
    ORDER BY id DESC LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM pulse_jobs j USING old WHERE j.id = old.id RETURNING j.id
), woken AS (
    SELECT pg_notify('pulse_done', g.id::text) FROM gone g
    WHERE EXISTS (SELECT 1 FROM pulse_job_waiters w WHERE w.job_id = g.id)
)
SELECT (SELECT count(*) FROM old) AS selected, (SELECT count(*) FROM gone) AS changed,
       (SELECT min(id) FROM old) AS last_id, (SELECT count(*) FROM woken) AS woken,
       ARRAY[]::text[] AS queues

-- name: cluster_processes
-- Every registered process (each node's scheduler heartbeats them), with
-- how long ago it last did: the console shows a silent node as such.
SELECT node_id, role, idx, pid, started_at, heartbeat_at, info,
       EXTRACT(EPOCH FROM now() - heartbeat_at)::float8 AS heartbeat_age_s
FROM pulse_processes ORDER BY node_id, role, idx

-- name: cluster_running
-- Running jobs per lease owner ("node/worker-N/pid"), from the lease index.
SELECT lease_owner, count(*) AS running FROM pulse_jobs WHERE state = 'running'
GROUP BY lease_owner

-- name: job_lease
SELECT lease_owner, lease_expires_at, timeout_s FROM pulse_jobs WHERE id = %(id)s

-- name: stats_rollup
-- The charts' rollup of the buckets first, first + width, ..., last (each
-- [start, start + width)), per queue and type and in total (queue = type =
-- '*'), in one statement: the buckets a new leader catches up on cost one
-- scan of the finished jobs and one count of the waiting ones, not one of
-- each per bucket (30 buckets at a first start: 2 s of a core behind a
-- 100,000-job backlog, in the middle of its drain). `waiting` is the depth
-- when written, in each bucket written. Fenced: only the leader writes; a
-- bucket is written once (a second leader's try changes nothing).
WITH fence AS (
    SELECT 1 FROM pulse_leader
    WHERE name = %(leader_name)s AND leader_id = %(leader_id)s AND term = %(term)s
      AND expires_at > now()
    FOR SHARE
), buckets AS (
    SELECT generate_series(%(first)s::timestamptz, %(last)s::timestamptz,
                           make_interval(secs => %(width)s::float8)) AS bucket
), ended AS (
    SELECT %(first)s::timestamptz + make_interval(secs => %(width)s::float8 * floor(
               EXTRACT(EPOCH FROM finished_at - %(first)s::timestamptz) / %(width)s::float8)) AS bucket,
           queue, type, state, EXTRACT(EPOCH FROM started_at - run_at) AS pickup_s
    FROM pulse_jobs
    WHERE state IN ('completed', 'failed', 'cancelled')
      AND finished_at >= %(first)s::timestamptz
      AND finished_at < %(last)s::timestamptz + make_interval(secs => %(width)s::float8)
), finished AS (
    SELECT bucket, COALESCE(queue, '*') AS queue, COALESCE(type, '*') AS type,
           count(*) FILTER (WHERE state = 'completed') AS completed,
           count(*) FILTER (WHERE state = 'failed') AS failed,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY pickup_s)
               FILTER (WHERE pickup_s IS NOT NULL) AS p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY pickup_s)
               FILTER (WHERE pickup_s IS NOT NULL) AS p95
    FROM ended
    GROUP BY GROUPING SETS ((bucket, queue, type), (bucket))
), retried AS (
    -- Attempts that ended in an error and will run again (not the last
    -- attempt of a job that failed for good).
    SELECT %(first)s::timestamptz + make_interval(secs => %(width)s::float8 * floor(
               EXTRACT(EPOCH FROM a.finished_at - %(first)s::timestamptz) / %(width)s::float8)) AS bucket,
           j.queue, j.type
    FROM pulse_job_attempts a JOIN pulse_jobs j ON j.id = a.job_id
    WHERE a.finished_at >= %(first)s::timestamptz
      AND a.finished_at < %(last)s::timestamptz + make_interval(secs => %(width)s::float8)
      AND a.outcome IN ('error', 'timeout', 'worker_died', 'lease_expired')
      AND NOT (j.state = 'failed' AND a.attempt = j.attempt)
), retried_counts AS (
    SELECT bucket, COALESCE(queue, '*') AS queue, COALESCE(type, '*') AS type, count(*) AS retried
    FROM retried
    GROUP BY GROUPING SETS ((bucket, queue, type), (bucket))
), waiting AS (
    SELECT COALESCE(queue, '*') AS queue, COALESCE(type, '*') AS type, count(*) AS waiting
    FROM pulse_jobs WHERE state IN ('available', 'scheduled', 'retryable')
    GROUP BY GROUPING SETS ((queue, type), ())
), keys AS (
    SELECT bucket, queue, type FROM finished
    UNION SELECT bucket, queue, type FROM retried_counts
    UNION SELECT b.bucket, w.queue, w.type FROM buckets b CROSS JOIN waiting w
    UNION SELECT b.bucket, '*', '*' FROM buckets b
)
INSERT INTO pulse_stats (bucket, queue, type, completed, failed, retried, waiting,
                         pickup_p50_s, pickup_p95_s)
SELECT k.bucket, k.queue, k.type, COALESCE(f.completed, 0), COALESCE(f.failed, 0),
       COALESCE(r.retried, 0), COALESCE(w.waiting, 0), f.p50, f.p95
FROM keys k
LEFT JOIN finished f USING (bucket, queue, type)
LEFT JOIN retried_counts r USING (bucket, queue, type)
LEFT JOIN waiting w USING (queue, type)
WHERE EXISTS (SELECT 1 FROM fence)
ON CONFLICT (bucket, queue, type) DO NOTHING

-- name: stats_last_bucket
SELECT max(bucket) AS bucket FROM pulse_stats WHERE queue = '*' AND type = '*'

-- name: stats_prune
-- Keep the rollup bounded: buckets older than `keep` seconds go. Fenced.
WITH fence AS (
    SELECT 1 FROM pulse_leader
    WHERE name = %(leader_name)s AND leader_id = %(leader_id)s AND term = %(term)s
      AND expires_at > now()
    FOR SHARE
)
DELETE FROM pulse_stats
WHERE bucket < now() - make_interval(secs => %(keep)s::float8) AND EXISTS (SELECT 1 FROM fence)

-- name: stats_series
-- The charts: totals per bucket over the last `window` seconds, and the
-- waiting depth per queue and type.
SELECT bucket, queue, type, completed, failed, retried, waiting, pickup_p50_s, pickup_p95_s
FROM pulse_stats
WHERE bucket >= now() - make_interval(secs => %(window)s::float8)
ORDER BY bucket, queue, type

-- =============================================================================
-- Node commands (issue 19): drain / resume a node from another node's API.
-- The table is described in migration 0015; pulsed/node_commands.py uses
-- these from both ends (the API that asks, the target node's scheduler).
-- =============================================================================

-- name: node_liveness
-- Is the node in the registry, how long since its last heartbeat, and does
-- it run a master (a `pulsed --role` node has none to drain its workers)?
SELECT EXTRACT(EPOCH FROM now() - max(heartbeat_at))::float8 AS heartbeat_age_s,
       bool_or(role = 'master') AS has_master
FROM pulse_processes WHERE node_id = %(node_id)s
HAVING count(*) > 0

-- name: node_command_add
-- A request for a node; the NOTIFY (sent at commit) wakes its scheduler.
WITH added AS (
    INSERT INTO pulse_node_commands (node_id, command, requested_by, requested_from)
    VALUES (%(node_id)s, %(command)s, %(requested_by)s, %(requested_from)s)
    RETURNING id
)
SELECT added.id, pg_notify('pulse_node_commands', %(node_id)s) IS NULL AS notified FROM added

-- name: node_command_get
SELECT id, node_id, command, requested_by, requested_at, done_at, outcome
FROM pulse_node_commands WHERE id = %(id)s

-- name: node_commands_listen
LISTEN pulse_node_commands

-- name: node_commands_pending
-- This node's requests not yet carried out, oldest first, each with its age
-- (a request older than the node's horizon is acknowledged as expired).
SELECT id, command, requested_by, requested_from,
       EXTRACT(EPOCH FROM now() - requested_at)::float8 AS age_s
FROM pulse_node_commands
WHERE node_id = %(node_id)s AND done_at IS NULL
ORDER BY id

-- name: node_command_done
-- Acknowledge a request once; false if it was already.
UPDATE pulse_node_commands SET done_at = now(), outcome = %(outcome)s
WHERE id = %(id)s AND done_at IS NULL
RETURNING id

-- name: node_commands_prune
DELETE FROM pulse_node_commands
WHERE requested_at < now() - make_interval(secs => %(keep)s::float8)
