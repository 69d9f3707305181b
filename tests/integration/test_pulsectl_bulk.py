"""pulsectl retry|cancel|delete by filter (issue 19) against a real database."""

from __future__ import annotations

import io

import pytest

from tests.integration.test_bulk_actions import jobs, states
from tests.integration.test_pulsectl import Run, config_file, ctl, run  # noqa: F401 (fixtures)


def test_dry_run_prints_the_count_and_changes_nothing(ctl: Run, conn) -> None:
    ids = jobs(conn, 4, "email", state="failed", error="boom")
    jobs(conn, 2, "sms", state="failed")
    result = ctl("retry", "--state", "failed", "--type", "email", "--dry-run")
    assert result.code == 0, result.err
    assert result.out.startswith("4 jobs would be retried")
    assert set(states(conn, ids).values()) == {"failed"}
    assert ctl("--json", "retry", "--state", "failed", "--dry-run").json["matched"] == 6


def test_retry_by_filter_with_yes(ctl: Run, conn) -> None:
    ids = jobs(conn, 3, "email", state="failed", error="SMTPError")
    kept = jobs(conn, 2, "email", state="failed", error="KeyError")
    result = ctl("--json", "retry", "--state", "failed", "--error", "smtp", "--yes")
    assert result.code == 0, result.err
    assert result.json["changed"] == 3 and result.json["by"].startswith("pulsectl:")
    assert set(states(conn, ids).values()) == {"available"}
    assert set(states(conn, kept).values()) == {"failed"}


def test_cancel_by_queue_and_delete_by_age(ctl: Run, conn) -> None:
    mail = jobs(conn, 3, "email", queue="mail")
    other = jobs(conn, 2, "email", queue="other")
    assert ctl("cancel", "--queue", "mail", "--yes").out.startswith("3 jobs cancelled")
    assert set(states(conn, mail).values()) == {"cancelled"}
    assert set(states(conn, other).values()) == {"available"}
    conn.execute("UPDATE pulse_jobs SET finished_at = now() - interval '8 days' "
                 "WHERE id = ANY(%s)", (mail[:2],))
    assert ctl("delete", "--state", "cancelled", "--older-than", "7d", "--yes").code == 0
    assert sorted(states(conn, mail)) == [mail[2]]


def test_delete_one_job_by_id(ctl: Run, conn) -> None:
    (job_id,) = jobs(conn, 1, "email", state="completed")
    assert ctl("delete", str(job_id)).out.startswith("1 jobs deleted")
    assert states(conn, [job_id]) == {}


def test_it_asks_first_and_no_answers_no(ctl: Run, conn, monkeypatch) -> None:
    ids = jobs(conn, 2, "email")
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    monkeypatch.setattr("sys.stdin.isatty", lambda: True, raising=False)
    result = ctl("cancel", "--type", "email")
    assert result.code == 1 and "nothing changed" in result.err
    assert set(states(conn, ids).values()) == {"available"}


@pytest.mark.parametrize("argv, words", [
    (["delete"], "needs a job ID or a filter"),
    (["cancel", "--type", "email"], "pass --yes"),  # stdin is not a terminal here
    (["retry", "5", "--state", "failed"], "not both"),
    (["delete", "--older-than", "soon"], "not a duration"),
    (["cancel", "--state", "bogus"], "invalid choice"),
])
def test_usage_errors_say_what_is_wrong(ctl: Run, conn, argv, words) -> None:
    jobs(conn, 1, "email")
    result = ctl(*argv)
    assert result.code == 2
    assert words in result.err
