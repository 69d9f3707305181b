-- Version 14: the console's error-text search (issue 19) through a trigram
-- index. The browser and the bulk actions filter on `last_error ILIKE
-- '%text%'` (pulsed/db/browse.py escapes %, _ and \ in the user's text,
-- so they match themselves); without an index that reads every row of the
-- state (0.2-2.5 s on 5,100,000 jobs; 4-28 ms with it: docs/console.md).
--
-- pg_trgm ships in PostgreSQL's contrib (Debian's server and the embedded
-- wheel both have it) and is a trusted extension (PostgreSQL 13+): a
-- database owner may create it. A server without it, or a role not allowed
-- to create it, still migrates: the search then reads the rows, slower, and
-- a NOTICE says why. The operator class is named with the extension's schema,
-- so it is found whatever the search_path (the extension may already live in
-- another schema).
--
-- Partial (last_error IS NOT NULL): jobs that never failed, nearly all of
-- them, are not in it, and a completion (last_error NULL) adds no entry.
-- An entry is written when an attempt fails (off the fast path) and on the
-- next claim of that job; GIN's pending list batches them.
--
-- Not CONCURRENTLY: migrations run in one transaction (pulsed/db/migrate.py),
-- and CONCURRENTLY refuses a transaction (or DO) block. The build reads the
-- table once under a SHARE lock (writes wait): 3.8 s and 6.1 s on
-- 5,100,000 rows of which 250,000 have an error, once, at upgrade. On a
-- much larger table, create the index CONCURRENTLY by hand first (same
-- name and definition): IF NOT EXISTS then skips the build here.
DO $$
DECLARE
    trgm_schema text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm') THEN
        RAISE NOTICE 'pg_trgm is not available on this server: the error search works '
                     'without an index (slower on a large table)';
        RETURN;
    END IF;
    BEGIN
        CREATE EXTENSION IF NOT EXISTS pg_trgm;
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE NOTICE 'not allowed to create the extension pg_trgm (%): the error search '
                     'works without an index; a superuser can run CREATE EXTENSION pg_trgm '
                     'and then CREATE INDEX pulse_jobs_error_trgm_idx as here', SQLERRM;
        RETURN;
    END;
    SELECT n.nspname INTO trgm_schema
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'pg_trgm';
    EXECUTE format('CREATE INDEX IF NOT EXISTS pulse_jobs_error_trgm_idx ON pulse_jobs '
                   'USING gin (last_error %I.gin_trgm_ops) WHERE last_error IS NOT NULL',
                   trgm_schema);
END
$$;
