"""The connection factory: names, timeouts and keepalives as the server sees
them (pg_stat_activity, SHOW), and the reconnect backoff's growth, jitter
and cap."""

from __future__ import annotations

import psycopg
import pytest

from pulsed.db.connect import ROLES, Backoff, UnknownRole, connect, connect_kwargs


def _activity(observer: psycopg.Connection, pid: int) -> str:
    row = observer.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                           (pid,)).fetchone()
    assert row is not None, f"backend {pid} is not in pg_stat_activity"
    return row[0]


def test_each_role_is_named_in_pg_stat_activity(dsn: str, conn: psycopg.Connection) -> None:
    for role_name, instance, expected in [("worker", 3, "pulse worker 3"),
                                          ("scheduler", None, "pulse scheduler"),
                                          ("api", None, "pulse api"),
                                          ("master", None, "pulse master"),
                                          ("pulsectl", None, "pulsectl")]:
        with connect(dsn, role_name, instance=instance) as opened:
            assert _activity(conn, opened.info.backend_pid) == expected
            assert opened.autocommit


def test_role_timeouts_are_set_on_the_session(dsn: str) -> None:
    with connect(dsn, "scheduler") as opened:
        shown = {name: opened.execute(f"SHOW {name}").fetchone()[0]
                 for name in ("statement_timeout", "lock_timeout",
                              "idle_in_transaction_session_timeout", "jit")}
    assert shown == {"statement_timeout": "10s", "lock_timeout": "1s",
                     "idle_in_transaction_session_timeout": "2s", "jit": "off"}
    with connect(dsn, "master") as opened:
        assert opened.execute("SHOW statement_timeout").fetchone()[0] == "10s"
        assert opened.execute("SHOW lock_timeout").fetchone()[0] == "5s"
    with connect(dsn, "worker", instance="w", settings="-c enable_sort=off") as opened:
        assert opened.execute("SHOW enable_sort").fetchone()[0] == "off"
        assert opened.execute("SHOW idle_in_transaction_session_timeout").fetchone()[0] == "1min"


def test_connect_timeout_and_keepalives_reach_libpq(dsn: str) -> None:
    with connect(dsn, "api") as opened:
        params = opened.info.get_parameters()
        assert params["connect_timeout"] == str(ROLES["api"].connect_timeout)
        assert params["keepalives"] == "1"
        assert params["keepalives_idle"] == "30"


def test_session_options_in_the_dsn_are_kept(dsn: str) -> None:
    with connect(f"{dsn} options='-c search_path=public,pg_catalog'", "scheduler") as opened:
        assert opened.execute("SHOW search_path").fetchone()[0] == "public,pg_catalog"
        assert opened.execute("SHOW lock_timeout").fetchone()[0] == "1s"


def test_transaction_pooler_sends_no_options_and_prepares_nothing(dsn: str) -> None:
    kwargs = connect_kwargs(dsn, "scheduler", pooler="transaction")
    assert "options" not in kwargs
    with connect(dsn, "worker", instance=1, pooler="transaction") as opened:
        assert opened.prepare_threshold is None
        for _ in range(10):  # past psycopg's default threshold (5)
            opened.execute("SELECT %s::int", (1,))
        assert opened.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0] == 0
    with connect(dsn, "worker", instance=1) as direct:  # the default does prepare
        for _ in range(10):
            direct.execute("SELECT %s::int", (1,))
        assert direct.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0] > 0


def test_bad_role_or_pooler_is_named() -> None:
    with pytest.raises(UnknownRole, match="'wroker'"):
        connect_kwargs("dbname=x", "wroker")
    with pytest.raises(ValueError, match="'session'"):
        connect_kwargs("dbname=x", "worker", pooler="session")


def test_overrides_win(dsn: str) -> None:
    kwargs = connect_kwargs(dsn, "script", autocommit=False, application_name="my app")
    assert kwargs["application_name"] == "my app" and kwargs["autocommit"] is False


def test_backoff_grows_doubling_to_the_cap_without_jitter() -> None:
    backoff = Backoff(base=0.1, cap=1.0, jitter=0.0)
    assert [round(backoff.next_delay(), 3) for _ in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.0,
                                                                  1.0, 1.0]
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.1)


def test_backoff_jitter_stays_in_its_band_and_varies() -> None:
    backoff = Backoff(base=1.0, cap=1.0, jitter=0.5)
    delays = [backoff.next_delay() for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays)
    assert max(delays) - min(delays) > 0.2  # not one fixed value: jittered


def test_backoff_never_overflows_after_many_failures() -> None:
    backoff = Backoff(base=0.2, cap=5.0, jitter=0.0)
    for _ in range(5000):
        delay = backoff.next_delay()
    assert delay == 5.0


def test_backoff_wait_sees_a_stop_at_once() -> None:
    backoff = Backoff(base=30.0, cap=30.0, jitter=0.0)
    assert backoff.wait(lambda: True) == 30.0  # chose 30 s, slept none of it


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="base"):
        Backoff(base=0, cap=1)
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=1.0)
