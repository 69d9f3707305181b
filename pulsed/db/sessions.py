"""Session settings for Pulse's database connections, by role (passed as
libpq `options` when a connection opens)."""

from __future__ import annotations

import os

from psycopg.conninfo import conninfo_to_dict


# Session settings every Pulse connection pins over the defaults a DBA or a
# host gives the database or the role (ALTER DATABASE / ALTER ROLE ... SET):
# the text forms psycopg reads values back from. psycopg parses a timestamptz
# only in DateStyle ISO (under 'SQL, DMY', 'German' or 'Postgres' the first
# row holding one raised NotImplementedError: the scheduler crash-looped on
# its cron tick, claims, `pulsectl jobs` and GET /jobs/{id} failed), an
# interval only in IntervalStyle postgres, and a float4 or float8 comes with
# all its digits only when extra_float_digits > 0 (at -15 a job's timeout_s
# of 45 was read back as 40, 1.5 as 2). Only the output format: DateStyle
# ISO keeps the database's DMY/MDY order for input, which Pulse's ISO values
# do not depend on.
#
# And the isolation level Pulse's statements are written for: READ
# COMMITTED, where an UPDATE of a row changed since the statement's snapshot
# re-reads it and FOR UPDATE SKIP LOCKED passes over what another claim
# took. Under a default_transaction_isolation of 'repeatable read' or
# 'serializable', claims and completions of workers side by side failed
# with serialization errors, which the worker took for a lost connection:
# it dropped it, backed off and gave jobs back.
PINNED_SESSION = ("-c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=1"
                  r" -c default_transaction_isolation=read\ committed")

# Session settings for the daemon's background readers (the scheduler's
# status snapshot, the API and /metrics). PostgreSQL shares the host's cores
# with the workers: a status count that goes parallel (three backends) or
# JIT-compiles (~100 ms) takes them from the jobs; one backend, no JIT.
BACKGROUND_SESSION = "-c max_parallel_workers_per_gather=0 -c jit=off"

# Session settings for the scheduler's connection: BACKGROUND_SESSION, and
# bounds on how long a transaction, a lock wait and a statement may last. A
# leader frozen inside a transaction (SIGSTOP, a paused VM) right after a
# cron tick's claim kept the lease row share-locked, and the follower's
# election waited 45 s behind it while no job was promoted and no lease
# reaped. The server now ends such a session after
# SCHEDULER_IDLE_IN_TRANSACTION (its transaction rolls back, its locks go):
# maintenance transactions are a few statements back to back, so only a
# stalled process stays idle in one that long. A statement waits at most
# SCHEDULER_LOCK_TIMEOUT for a lock and runs at most
# SCHEDULER_STATEMENT_TIMEOUT (a batch of the pruner or the reaper takes
# well under a second); either one cancelled is tried again next round.
SCHEDULER_IDLE_IN_TRANSACTION = "2s"
SCHEDULER_LOCK_TIMEOUT = "1s"
SCHEDULER_STATEMENT_TIMEOUT = "10s"
SCHEDULER_SESSION = (f"{BACKGROUND_SESSION}"
                     f" -c idle_in_transaction_session_timeout={SCHEDULER_IDLE_IN_TRANSACTION}"
                     f" -c lock_timeout={SCHEDULER_LOCK_TIMEOUT}"
                     f" -c statement_timeout={SCHEDULER_STATEMENT_TIMEOUT}")

# Session settings for a worker's connection: claim_plan_settings (see
# queries.sql) for the whole session, so a claim needs no statement of its
# own for them. Nothing else a worker runs on that connection wants a
# sequential scan or a sort: completions, give-backs and failures go by
# primary key. TimeZone=UTC: psycopg builds a UTC timestamptz straight from
# the wire, while any other zone (Etc/UTC included) costs a zoneinfo
# conversion per value, and again in each job's timestamp() for its wait
# metric: ~2 us of a drain's ~33 per job (W1). A claimed Job's datetimes
# are the same instants, in UTC, whatever the server's TimeZone.
CLAIM_SESSION = "-c enable_seqscan=off -c enable_sort=off -c jit=off -c TimeZone=UTC"


def session_options(dsn: str, settings: str) -> str:
    """`options` for connect(): settings after those the DSN (or PGOPTIONS)
    already gives, which passing options= would otherwise replace (a
    search_path set there, say)."""
    given = conninfo_to_dict(dsn).get("options") or os.environ.get("PGOPTIONS", "")
    return f"{given} {settings}".strip()
