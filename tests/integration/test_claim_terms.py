"""A worker's claim terms (owner, lease TTL, aging, queues, handled types,
type limits, default attempts) are written into its claim statements as
literals (pulsed/db/store_worker.py: ClaimTexts): each claim sends only its
limit and its completions. Values with quotes, backslashes, percent signs
(psycopg's placeholder character) and non-ASCII text must claim exactly
what they did as parameters."""

from __future__ import annotations

import psycopg
import pytest

import pulsed
from pulsed.db.connect import connect
from pulsed.db.store import CLAIM_SESSION, ClaimTerms, Store, TypeLimit, queries

pytestmark = pytest.mark.usefixtures("fast_commits")

# Each one a way a literal could go wrong: a quote ending it, a backslash
# escaping it (E'' strings), a placeholder psycopg would fill, non-ASCII.
OWNER = "node 'a'\\%(queues)s %(limit)s %s ü"  # queues: a term written in after owner
QUEUE = "q'%(owner)s\\ é"
PLAIN = "t'plain%\\ ü"
LIMITED = "t'limited%s ☃"


def _claim(store: Store, limit: int = 10, done: list | None = None,
           claim_session: bool = False, **terms):
    terms = {"owner": OWNER, "lease_ttl": 30.0, "queues": [QUEUE],
             "handled": [PLAIN, LIMITED], "default_attempts": {PLAIN: 7}, **terms}
    return store.complete_and_claim(done or [], ClaimTerms.of(**terms), limit=limit,
                                    claim_session=claim_session)


def test_terms_with_quotes_backslashes_and_percent_signs_claim_what_they_name(
        conn: psycopg.Connection) -> None:
    wanted = pulsed.enqueue(conn, PLAIN, queue=QUEUE)
    other_queue = pulsed.enqueue(conn, PLAIN, queue="default")
    unhandled = pulsed.enqueue(conn, "t'other", queue=QUEUE)
    limited = [pulsed.enqueue(conn, LIMITED, queue=QUEUE) for _ in range(2)]
    conn.commit()
    store = Store(conn)

    held, jobs = _claim(store, limits=(TypeLimit(LIMITED, concurrency=1),))
    conn.commit()
    # the plain job, and one of the limited type (its concurrency is 1)
    assert sorted(job.id for job in jobs) == [wanted, limited[0]]
    rows = dict(conn.execute("SELECT id, lease_owner FROM pulse_jobs WHERE state = 'running'"))
    assert rows == {wanted: OWNER, limited[0]: OWNER}
    assert {job.id: job.max_attempts for job in jobs}[wanted] == 7
    waiting = {r[0] for r in conn.execute("SELECT id FROM pulse_jobs WHERE state = 'available'")}
    assert waiting == {other_queue, unhandled, limited[1]}

    # the completion goes with the next claim, through the same texts
    held, more = _claim(store, done=jobs, limits=(TypeLimit(LIMITED, concurrency=1),))
    conn.commit()
    assert held == {wanted, limited[0]}
    assert [job.id for job in more] == [limited[1]]


def test_other_terms_on_the_same_store_claim_by_their_own_terms(
        conn: psycopg.Connection) -> None:
    here = pulsed.enqueue(conn, PLAIN, queue=QUEUE)
    there = pulsed.enqueue(conn, PLAIN, queue="there")
    conn.commit()
    store = Store(conn)
    assert [job.id for job in _claim(store)[1]] == [here]
    assert [job.id for job in _claim(store, queues=["there"], owner="b")[1]] == [there]
    conn.commit()
    assert dict(conn.execute("SELECT id, lease_owner FROM pulse_jobs")) == {here: OWNER,
                                                                          there: "b"}


def test_a_workers_claims_send_only_the_limit_and_the_completions(dsn: str) -> None:
    """What makes the claim cheap: the server's prepared statements take
    one parameter (the limit), and four with completions (the limit, ids,
    lease tokens, results), not the terms again on every claim."""
    with psycopg.connect(dsn, autocommit=True) as client, \
            connect(dsn, "worker", instance="w", settings=CLAIM_SESSION) as worker:
        store = Store(worker)
        for _ in range(8):  # psycopg prepares a statement at its fifth run
            pulsed.enqueue(client, PLAIN, queue=QUEUE)
            jobs = _claim(store, limit=1, claim_session=True)[1]
            assert len(jobs) == 1
            _claim(store, done=jobs, limit=1, claim_session=True)
        counts = {row[0]: row[1] for row in worker.execute(
            "SELECT split_part(statement, E'\\n', 1), cardinality(parameter_types) "
            "FROM pg_prepared_statements")}
    assert counts == {queries()["job_claim"].splitlines()[0]: 1,
                      queries()["job_complete_and_claim"].splitlines()[0]: 4}, counts


def test_terms_the_connections_encoding_cannot_read_back_go_as_parameters(
        conn: psycopg.Connection) -> None:
    """Under client_encoding SQL_ASCII psycopg reads text as ASCII: a
    non-ASCII owner, queue or type cannot be written into the statement,
    and is sent as a parameter, as before there were literals."""
    wanted = pulsed.enqueue(conn, PLAIN, queue=QUEUE)
    conn.execute("SET client_encoding TO 'SQL_ASCII'")
    store = Store(conn)
    held, jobs = _claim(store, limits=(TypeLimit(LIMITED, concurrency=1),))
    assert [job.id for job in jobs] == [wanted]
    assert {job.id: job.max_attempts for job in jobs} == {wanted: 7}
    assert store.claim_texts(ClaimTerms.of(owner=OWNER, lease_ttl=30.0)).params == {
        "owner": OWNER}
