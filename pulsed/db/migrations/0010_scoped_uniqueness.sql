-- Version 10: uniqueness with a scope (issue 17).
--
-- An idempotency key is held by the jobs the unique index below covers,
-- and a second job with a held key cannot be inserted, so racing enqueues
-- never create two holders: the index decides, atomically, as before.
--
-- unique_while = 'unfinished': the job holds its key only while it has not
-- finished. The index's predicate reads the state, so a completion, failure
-- or cancellation releases the key by the update it makes anyway (the state
-- is in other partial indexes' predicates already, so those updates were
-- never HOT): nothing is added to the finishing statements.
ALTER TABLE pulse_jobs ADD COLUMN unique_while text
    CHECK (unique_while IN ('unfinished'));
-- unique_until: the job holds its key until then (unique_for seconds after
-- its enqueue). A time cannot be in an index predicate, so the key is
-- released lazily: the next enqueue that meets an expired holder sets
-- key_released_at on it (one fenced update, only then), which takes the
-- row out of the index, and inserts again.
ALTER TABLE pulse_jobs ADD COLUMN unique_until timestamptz;
ALTER TABLE pulse_jobs ADD COLUMN key_released_at timestamptz;

-- Without a scope a job holds its key until it is pruned, as before.
DROP INDEX pulse_jobs_idempotency_idx;
CREATE UNIQUE INDEX pulse_jobs_idempotency_idx ON pulse_jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL AND key_released_at IS NULL
      AND (unique_while IS NULL OR state NOT IN ('completed', 'failed', 'cancelled'));
