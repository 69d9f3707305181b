"""job_complete_and_claim (the worker's completions and next claim as one
statement) repeats job_complete_many's and job_claim's SQL: a change to
either must reach it too. This compares the texts, comments and layout
aside, so the copy cannot drift."""

from __future__ import annotations

import re

from pulsed.db.sql import queries

# What the combined statement adds to job_claim's scans: run the completion
# (CTE `done`) before the claim locks anything.
ORDERING = "AND (SELECT count(*) FROM done) >= 0"


def _words(sql: str) -> str:
    """The SQL without comments, whitespace collapsed."""
    without_comments = "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
    return re.sub(r"\s+", " ", without_comments).strip()


def test_the_completion_is_job_complete_many_s():
    combined = _words(queries()["job_complete_and_claim"])
    complete = _words(queries()["job_complete_many"])
    ctes = complete[:complete.index(" SELECT id, (SELECT count(*) FROM woken)")]
    assert combined.startswith(ctes + ", overdue AS (")


def test_the_claim_is_job_claim_s_with_the_completion_first():
    combined = _words(queries()["job_complete_and_claim"])
    assert combined.count(ORDERING) == 2  # in both scans: overdue and ranked
    claim = _words(queries()["job_claim"])
    assert claim.startswith("WITH overdue AS (")
    scans, update = claim[len("WITH "):].split(" UPDATE pulse_jobs j ", 1)
    expected = scans + " claimed AS ( UPDATE pulse_jobs j " + update + " )"
    expected = expected.replace("), picked AS", "), picked AS", 1).replace(
        ") claimed AS (", "), claimed AS (", 1)
    assert _words(combined.replace(ORDERING + " ", "")).find(expected) > 0, (
        "job_complete_and_claim's claim differs from job_claim")


def test_the_result_starts_with_lost_and_woken():
    combined = _words(queries()["job_complete_and_claim"])
    assert combined.endswith(
        "SELECT (SELECT array_agg(c.id) FROM unnest(%(ids)b::bigint[]) AS c(id) "
        "WHERE c.id NOT IN (SELECT id FROM done)) AS lost, "
        "(SELECT count(*) FROM woken) AS woken, c.* "
        "FROM (SELECT 1) AS one LEFT JOIN claimed c ON true")
