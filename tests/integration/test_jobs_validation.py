"""Bad enqueue arguments: each raises pulsed.JobInputError naming the
argument, writes nothing, and leaves the caller's transaction usable (the
api module's promise: "Every argument is checked before anything is
written")."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pulsed
from pulsed import api
from pulsed.db.store import Store
from tests.pg import create_database, drop_database, unique_name


@pytest.fixture(scope="module")
def dsn(admin_dsn: str, template_db: str) -> Iterator[str]:
    """One database for this module: every test here checks that it wrote
    nothing (counting rows before and after), so they can share it, and a
    database per case costs more than the cases."""
    name = unique_name("pulse_test_validation")
    dsn = create_database(admin_dsn, name, template=template_db)
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        # Thrown away afterwards: commits need not wait for the disk.
        admin.execute(sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(
            sql.Identifier(name)))
    yield dsn
    drop_database(admin_dsn, name)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


def count_jobs(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pulse_jobs").fetchone()[0]


def _nested(depth: int) -> dict[str, Any]:
    """A payload `depth` objects and arrays deep (the payload itself is one)."""
    value: Any = 1
    for _ in range(depth - 1):
        value = [value]
    return {"x": value}


class Unserialisable:
    pass


SOON = datetime.now(timezone.utc) + timedelta(hours=1)

# (test id, keyword arguments replacing the good ones, the argument named)
BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("empty type", {"type": ""}, "type"),
    ("blank type", {"type": "   "}, "type"),
    ("int type", {"type": 5}, "type"),
    ("None type", {"type": None}, "type"),
    ("bytes type", {"type": b"t"}, "type"),
    ("type too long", {"type": "t" * (api.MAX_TEXT_LENGTH + 1)}, "type"),
    ("type with NUL", {"type": "a\x00b"}, "type"),
    ("type with a lone surrogate", {"type": "job\ud800"}, "type"),
    ("payload list", {"payload": [1, 2]}, "payload"),
    ("payload str", {"payload": '{"a": 1}'}, "payload"),
    ("payload int", {"payload": 3}, "payload"),
    ("payload set value", {"payload": {"s": {1, 2}}}, "payload"),
    ("payload object value", {"payload": {"o": Unserialisable()}}, "payload"),
    ("payload NaN", {"payload": {"n": float("nan")}}, "payload"),
    ("payload infinity", {"payload": {"n": float("inf")}}, "payload"),
    ("payload tuple key", {"payload": {(1, 2): "x"}}, "payload"),
    ("payload NUL in value", {"payload": {"a": "x\x00y"}}, "payload"),
    ("payload NUL in key", {"payload": {"a\x00": 1}}, "payload"),
    ("payload NUL nested", {"payload": {"a": [{"b": "\x00"}]}}, "payload"),
    ("payload oversized", {"payload": {"a": "x" * api.MAX_PAYLOAD_BYTES}}, "payload"),
    ("payload lone surrogate", {"payload": {"a": "\ud800"}}, "payload"),
    # 3.12+'s json writes it, 3.11's cannot read it back: one bound for both
    ("payload nested 501 deep", {"payload": _nested(501)}, "payload"),
    ("payload nested 5,000 deep", {"payload": _nested(5000)}, "payload"),
    ("priority too high", {"priority": 40000}, "priority"),
    ("priority too low", {"priority": -40000}, "priority"),
    ("priority float", {"priority": 1.5}, "priority"),
    ("priority bool", {"priority": True}, "priority"),
    ("priority str", {"priority": "1"}, "priority"),
    ("priority None", {"priority": None}, "priority"),
    ("naive run_at", {"run_at": datetime(2030, 1, 1)}, "run_at"),
    ("run_at str", {"run_at": "2030-01-01T00:00:00Z"}, "run_at"),
    ("run_at epoch number", {"run_at": 1_900_000_000}, "run_at"),
    ("negative delay", {"delay": -1}, "delay"),
    ("NaN delay", {"delay": float("nan")}, "delay"),
    ("infinite delay", {"delay": float("inf")}, "delay"),
    ("str delay", {"delay": "10"}, "delay"),
    ("bool delay", {"delay": True}, "delay"),
    ("delay past the end of time", {"delay": 1e13}, "delay"),
    ("max_attempts 0", {"max_attempts": 0}, "max_attempts"),
    ("max_attempts negative", {"max_attempts": -1}, "max_attempts"),
    ("max_attempts float", {"max_attempts": 2.0}, "max_attempts"),
    ("max_attempts too big", {"max_attempts": 2**31}, "max_attempts"),
    ("empty queue", {"queue": ""}, "queue"),
    ("None queue", {"queue": None}, "queue"),
    ("queue too long", {"queue": "q" * (api.MAX_TEXT_LENGTH + 1)}, "queue"),
    ("empty idempotency_key", {"idempotency_key": ""}, "idempotency_key"),
    ("int idempotency_key", {"idempotency_key": 7}, "idempotency_key"),
    ("idempotency_key too long", {"idempotency_key": "k" * (api.MAX_TEXT_LENGTH + 1)},
     "idempotency_key"),
    ("type with a newline (forges log lines)", {"type": "email\nERROR forged"}, "type"),
    ("type with a carriage return", {"type": "a\rb"}, "type"),
    ("type with an escape", {"type": "a\x1b[31mred"}, "type"),
    ("type with DEL", {"type": "a\x7fb"}, "type"),
    ("type with a C1 control", {"type": "a\x85b"}, "type"),
    ("queue with a tab", {"queue": "q\tq"}, "queue"),
    ("queue with a newline", {"queue": "q\n"}, "queue"),
    ("idempotency_key with a newline", {"idempotency_key": "k\nk"}, "idempotency_key"),
    ("idempotency_key with NUL", {"idempotency_key": "k\x00"}, "idempotency_key"),
    ("run_at year 1 at +14:00 (stored as 1 BC)",
     {"run_at": datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14)))}, "run_at"),
    ("run_at year 1 UTC", {"run_at": datetime(1, 1, 1, tzinfo=timezone.utc)}, "run_at"),
    ("run_at before 1970", {"run_at": datetime(1969, 12, 31, 23, 59, tzinfo=timezone.utc)},
     "run_at"),
    ("run_at 9999-12-31 at -14:00 (year 10000 in UTC)",
     {"run_at": datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-14)))}, "run_at"),
    ("run_at on Python's last day", {"run_at": datetime.max.replace(tzinfo=timezone.utc)},
     "run_at"),
    ("zero timeout", {"timeout": 0}, "timeout"),
    ("timeout that underflows a real", {"timeout": 1e-300}, "timeout"),
    ("timeout under the minimum", {"timeout": api.TIMEOUT_MIN_S / 2}, "timeout"),
    ("timeout over the maximum", {"timeout": api.TIMEOUT_MAX_S * 2}, "timeout"),
    ("NaN timeout", {"timeout": float("nan")}, "timeout"),
    ("infinite timeout", {"timeout": float("inf")}, "timeout"),
    ("bool timeout", {"timeout": True}, "timeout"),
    ("negative NaN delay", {"delay": float("-nan")}, "delay"),
    ("negative timeout", {"timeout": -5}, "timeout"),
    ("timeout too large to store", {"timeout": 1e300}, "timeout"),
]

GOOD = {"type": "t", "payload": {"ok": True}}


def _params(overrides: dict[str, Any]) -> dict[str, Any]:
    return {**GOOD, **overrides}


@pytest.mark.parametrize(("overrides", "argument"),
                         [pytest.param(o, a, id=name) for name, o, a in BAD_INPUTS])
def test_enqueue_refuses_bad_input_writing_nothing(
        dsn: str, conn: psycopg.Connection, overrides: dict[str, Any], argument: str) -> None:
    before = count_jobs(conn)
    with psycopg.connect(dsn) as app:
        kept = pulsed.enqueue(app, "kept", {"n": 1})  # the application's earlier work
        with pytest.raises(pulsed.JobInputError) as info:
            pulsed.enqueue(app, **_params(overrides))
        # The caller's transaction is untouched and still usable.
        app.execute("SELECT 1")
        app.commit()

    assert info.value.argument == argument
    assert argument in str(info.value)
    assert count_jobs(conn) == before + 1
    assert Store(conn).get_job(kept).type == "kept"


@pytest.mark.parametrize(("overrides", "argument"),
                         [pytest.param(o, a, id=name) for name, o, a in BAD_INPUTS])
def test_enqueue_many_refuses_a_bad_item_among_good_ones_writing_nothing(
        dsn: str, conn: psycopg.Connection, overrides: dict[str, Any], argument: str) -> None:
    batch = [_params({"payload": {"i": i}}) for i in range(5)]
    batch[2] = _params(overrides)
    before = count_jobs(conn)
    with psycopg.connect(dsn) as app:
        with pytest.raises(pulsed.JobInputError) as info:
            pulsed.enqueue_many(app, batch)
        app.execute("SELECT 1")
        app.commit()

    assert info.value.argument == f"jobs[2].{argument}"
    assert f"jobs[2].{argument}" in str(info.value)
    assert count_jobs(conn) == before


def test_run_at_and_delay_together_are_refused(conn: psycopg.Connection) -> None:
    before = count_jobs(conn)
    with pytest.raises(pulsed.JobInputError) as info:
        pulsed.enqueue(conn, "t", run_at=SOON, delay=5)
    assert info.value.argument in ("run_at", "delay")
    with pytest.raises(pulsed.JobInputError) as info:
        pulsed.enqueue_many(conn, [GOOD, {**GOOD, "run_at": SOON, "delay": 5}])
    assert info.value.argument in ("jobs[1].run_at", "jobs[1].delay")
    assert count_jobs(conn) == before


@pytest.mark.parametrize(("item", "argument", "words"), [
    pytest.param(["t", {}], "jobs[1]", "must be a dict, got list", id="a list, not a dict"),
    pytest.param("t", "jobs[1]", "must be a dict, got str", id="a str, not a dict"),
    # it said "job_params() missing 1 required keyword-only argument"
    pytest.param({"payload": {}}, "jobs[1].type", "is required", id="no type"),
    pytest.param({"type": "t", "colour": "red"}, "jobs[1]", "unknown key 'colour'; the keys "
                 "are enqueue()'s: delay, idempotency_key,", id="an unknown key"),
])
def test_enqueue_many_refuses_malformed_items(conn: psycopg.Connection, item: Any,
                                              argument: str, words: str) -> None:
    before = count_jobs(conn)
    with pytest.raises(pulsed.JobInputError) as info:
        pulsed.enqueue_many(conn, [GOOD, item, GOOD])
    assert info.value.argument == argument
    assert words in str(info.value)
    assert count_jobs(conn) == before


@pytest.mark.parametrize("jobs", [GOOD, "t"], ids=["one job's dict", "a str"])
def test_enqueue_many_of_one_dict_says_to_pass_a_list(conn: psycopg.Connection,
                                                      jobs: Any) -> None:
    """A dict was iterated as its keys: "jobs[0]: must be a dict, got str"."""
    before = count_jobs(conn)
    with pytest.raises(pulsed.JobInputError) as info:
        pulsed.enqueue_many(conn, jobs)
    assert info.value.argument == "jobs"
    assert "must be a list of dicts, one per job" in str(info.value)
    assert count_jobs(conn) == before


def test_payload_of_exactly_the_limit_is_accepted(conn: psycopg.Connection) -> None:
    overhead = len(json.dumps({"a": ""}))
    payload = {"a": "x" * (api.MAX_PAYLOAD_BYTES - overhead)}
    assert len(json.dumps(payload).encode()) == api.MAX_PAYLOAD_BYTES
    job_id = pulsed.enqueue(conn, "t", payload)
    assert Store(conn).get_job(job_id).payload == payload


def test_payload_text_that_merely_looks_like_an_escaped_nul_is_accepted(
        conn: psycopg.Connection) -> None:
    # A backslash followed by "u0000" is six ordinary characters (a Windows
    # path, a regex, a code sample), not a NUL: jsonb stores it fine.
    payload = {"pattern": "\\u0000", "path": "C:\\u0000\\x"}
    job_id = pulsed.enqueue(conn, "t", payload)
    assert Store(conn).get_job(job_id).payload == payload


def test_unusual_but_valid_payloads_round_trip(conn: psycopg.Connection) -> None:
    payload = {"emoji": "\U0001f600", "nested": {"a": [1, [2, [3]]]}, "big": 10**30,
               "neg": -1.5e-300, "empty": {}, "list": [], "null": None, "bool": False,
               "quote": "\"'\\", "newline": "a\nb", "1": "int-like key"}
    job_id = pulsed.enqueue(conn, "t", payload)
    assert Store(conn).get_job(job_id).payload == payload


@pytest.mark.parametrize(("overrides", "words"), [
    pytest.param({"run_at": datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14)))},
                 ["1970-01-01", "9999-12-30"], id="run_at"),
    pytest.param({"timeout": 1e-300}, [f"{api.TIMEOUT_MIN_S:g}", f"{api.TIMEOUT_MAX_S:.0f}"],
                 id="timeout"),
    pytest.param({"priority": 32768}, ["-32768", "32767"], id="priority"),
    pytest.param({"max_attempts": 2**31}, ["1", str(2**31 - 1)], id="max_attempts"),
    pytest.param({"type": "a\nb"}, ["control characters", "U+0000..U+001F"], id="type"),
])
def test_a_refusal_names_the_allowed_range(conn: psycopg.Connection, overrides: dict[str, Any],
                                           words: list[str]) -> None:
    with pytest.raises(pulsed.JobInputError) as info:
        pulsed.enqueue(conn, **_params(overrides))
    for word in words:
        assert word in info.value.problem, info.value


@pytest.mark.parametrize("run_at", [
    pytest.param(api.RUN_AT_MIN, id="the first moment allowed"),
    pytest.param(api.RUN_AT_MAX, id="the last moment allowed"),
    pytest.param(datetime(9999, 12, 30, 13, tzinfo=timezone(timedelta(hours=14))),
                 id="the last moment, written at +14:00"),
])
def test_run_at_at_the_bounds_is_stored_and_read_back(conn: psycopg.Connection,
                                                      run_at: datetime) -> None:
    job_id = pulsed.enqueue(conn, "t", run_at=run_at)
    assert Store(conn).get_job(job_id).run_at == run_at


@pytest.mark.parametrize("timeout", [api.TIMEOUT_MIN_S, 0.5, api.TIMEOUT_MAX_S])
def test_timeouts_in_range_are_stored(conn: psycopg.Connection, timeout: float) -> None:
    job_id = pulsed.enqueue(conn, "t", timeout=timeout)
    stored = conn.execute("SELECT timeout_s FROM pulse_jobs WHERE id = %s", (job_id,)).fetchone()[0]
    assert stored == pytest.approx(timeout, rel=1e-6)


def test_a_handler_timeout_out_of_range_is_refused() -> None:
    registry = api.HandlerRegistry()
    with pytest.raises(pulsed.JobInputError) as info:
        registry.register("t", lambda job: None, timeout=1e-300)
    assert info.value.argument == "timeout"


def test_printable_unicode_in_type_and_queue_is_accepted(conn: psycopg.Connection) -> None:
    job_id = pulsed.enqueue(conn, "courriel \u00e9t\u00e9 \U0001f600", queue="file d'attente")
    assert Store(conn).get_job(job_id).type == "courriel \u00e9t\u00e9 \U0001f600"


def test_the_longest_delay_keeps_run_at_readable(conn: psycopg.Connection) -> None:
    """A delay is bounded (MAX_SECONDS) so that now + delay stays within
    the run_at range the door allows."""
    job_id = pulsed.enqueue(conn, "t", delay=api.MAX_SECONDS)
    run_at = Store(conn).get_job(job_id).run_at
    assert isinstance(run_at, datetime) and api.RUN_AT_MIN <= run_at <= api.RUN_AT_MAX


def test_a_payload_at_the_depth_limit_round_trips_through_a_claim(conn: psycopg.Connection
                                                                 ) -> None:
    deep = _nested(api.MAX_JSON_DEPTH)
    brackets = {"text": "[{" * 5000}  # brackets in strings are not nesting
    # this module's tests share a database: a queue of its own
    ids = [pulsed.enqueue(conn, "t", payload, queue="depth") for payload in (deep, brackets)]
    jobs = Store(conn).claim(owner="w", limit=3, lease_ttl=30, queues=["depth"])
    assert {job.id: job.payload for job in jobs} == dict(zip(ids, (deep, brackets)))
