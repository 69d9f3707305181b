"""The only code that executes SQL. Queries come from queries.sql by name.

A Store wraps one psycopg connection it does not own: the application's
(enqueue inside its transaction) or a worker's. It is the error boundary:
a lost or refused connection in any public method leaves as
pulsed.errors.StoreUnavailable (a StoreError, and still a
psycopg.OperationalError for code and applications written against
psycopg). Errors of a statement on a live connection (a lock or statement
timeout, a constraint, a deadlock) pass through as psycopg raised them:
their callers tell them apart.

The Store's statements are grouped by who runs them, one module each:
store_enqueue (applications), store_worker (workers), store_leader (the
master and the leader), store_operator (pulsectl, the HTTP API),
store_nodes (drain / resume requests between nodes); rows turns
rows into Pulse's objects, sessions holds the connections' settings.
"""

from __future__ import annotations

from pulsed.db.boundary import with_error_boundary
from pulsed.db.rows import UNREADABLE_ERROR_CLASS
from pulsed.db.sessions import (BACKGROUND_SESSION, CLAIM_SESSION, SCHEDULER_IDLE_IN_TRANSACTION,
                                SCHEDULER_LOCK_TIMEOUT, SCHEDULER_SESSION,
                                SCHEDULER_STATEMENT_TIMEOUT, session_options)
from pulsed.db.sql import queries
from pulsed.db.store_enqueue import (EnqueueQueries, Statement, insert_job_steps,
                                     insert_jobs_steps, run_steps, run_steps_async)
from pulsed.db.store_leader import (LEADER_NAME, WAITING_STATES, WORKER_ALIVE_S,
                                    WORKER_TYPES_GRACE_S, LeaderQueries)
from pulsed.db.store_nodes import NodeCommandQueries
from pulsed.db.store_operator import OperatorQueries
from pulsed.db.store_worker import ClaimTerms, TypeLimit, WorkerQueries, poison_note

__all__ = [
    "BACKGROUND_SESSION", "CLAIM_SESSION", "ClaimTerms", "LEADER_NAME",
    "SCHEDULER_IDLE_IN_TRANSACTION", "SCHEDULER_LOCK_TIMEOUT", "SCHEDULER_SESSION",
    "SCHEDULER_STATEMENT_TIMEOUT", "Store",
    "Statement", "TypeLimit", "UNREADABLE_ERROR_CLASS", "WAITING_STATES", "WORKER_ALIVE_S",
    "WORKER_TYPES_GRACE_S", "insert_job_steps", "insert_jobs_steps", "poison_note", "queries",
    "run_steps", "run_steps_async", "session_options",
]


@with_error_boundary
class Store(EnqueueQueries, WorkerQueries, LeaderQueries, OperatorQueries, NodeCommandQueries):
    """Every statement Pulse runs, on one connection it does not own."""
