-- Version 3: a job enqueued without max_attempts takes its type's default
-- (the handler's, else [types.NAME] max_attempts, else 20), resolved by the
-- worker that first claims it, since only workers know the handlers.
-- NULL until then means "the type's default".
ALTER TABLE pulse_jobs ALTER COLUMN max_attempts DROP NOT NULL;
ALTER TABLE pulse_jobs ALTER COLUMN max_attempts DROP DEFAULT;
