"""The states cancel and retry accept: pulsed.jobs' lists (which pulsectl
and the HTTP API quote in their errors) are the ones queries.sql acts on."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

import pulsed
from pulsed.db.store import Store
from pulsed.jobs import CANCELLABLE_STATES, RETRYABLE_STATES, JobState

pytestmark = pytest.mark.usefixtures("fast_commits")


def job_in(conn: psycopg.Connection, state: JobState) -> int:
    """A job put in `state` as its real path leaves it: a running job holds
    a lease (a CHECK says so); a finished one ran an attempt."""
    job_id = pulsed.enqueue(conn, "state_list")
    running, ran = state is JobState.RUNNING, state is JobState.RUNNING or state.is_finished
    conn.execute("UPDATE pulse_jobs SET state = %(state)s, attempt = %(ran)s::int,"
                 " lease_token = CASE WHEN %(running)s THEN gen_random_uuid() END,"
                 " lease_expires_at = CASE WHEN %(running)s THEN now() + interval '1 minute' END,"
                 " lease_owner = CASE WHEN %(ran)s THEN 'test' END,"
                 " started_at = CASE WHEN %(ran)s THEN now() END,"
                 " finished_at = CASE WHEN %(finished)s THEN now() END WHERE id = %(id)s",
                 {"state": state.value, "running": running, "ran": ran,
                  "finished": state.is_finished, "id": job_id})
    return job_id


@pytest.mark.parametrize(("action", "listed"), [(Store.cancel, CANCELLABLE_STATES),
                                                (Store.retry, RETRYABLE_STATES)],
                         ids=["cancel", "retry"])
def test_the_sql_acts_on_exactly_the_listed_states(
        conn: psycopg.Connection, action: Callable[[Store, int], bool],
        listed: tuple[str, ...]) -> None:
    store = Store(conn)
    acted = {state.value for state in JobState if action(store, job_in(conn, state))}
    assert acted == set(listed)
    assert len(listed) == len(set(listed))
