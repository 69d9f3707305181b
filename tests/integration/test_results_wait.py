"""Jobs that answer back: a handler's return value is the job's result,
and pulsed.wait() (Python, HTTP ?wait=, `pulsectl enqueue --wait`) returns
the finished job without polling."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
import tomli_w

import pulsed
from pulsed import serialize, waiting
from pulsed.api import HandlerRegistry
from pulsed.config import ApiConfig, Config
from pulsed.db.store import Store
from pulsed.errors import JobNotFound
from pulsed.http import ApiServer
from pulsed.waiting import WaitError
from pulsed.worker import Worker, WorkerOptions
from pulsectl.cli import main as pulsectl_main
from tests.pg import wait_until


def _registry() -> HandlerRegistry:
    registry = HandlerRegistry()
    registry.register("answer", lambda job: {"sum": sum(job.payload["n"]), "ok": True})
    registry.register("nothing", lambda job: None)
    registry.register("echo", lambda job: job.payload["value"])
    registry.register("bytes", lambda job: b"raw")
    registry.register("nan", lambda job: float("nan"))
    registry.register("nul", lambda job: {"text": "a\x00b"})
    registry.register("surrogate", lambda job: "\udcff")
    registry.register("big", lambda job: "x" * 2000)
    registry.register("fail", lambda job: (_ for _ in ()).throw(pulsed.Fail("no")))

    async def async_answer(job):
        await asyncio.sleep(0.01)
        return [job.payload["n"], "async"]
    registry.register("async_answer", async_answer)
    return registry


def _run(dsn: str, **options) -> int:
    worker = Worker(dsn, WorkerOptions(owner="w", max_result_bytes=1000, **options),
                    registry=_registry())
    return worker.run(stop_when_idle=True)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_handler_return_value_is_the_job_result(dsn, conn, concurrency):
    ids = pulsed.enqueue_many(conn, [
        {"type": "answer", "payload": {"n": [1, 2, 3]}}, {"type": "nothing"},
        {"type": "echo", "payload": {"value": "é ünicode"}},
        {"type": "echo", "payload": {"value": 0}}, {"type": "async_answer", "payload": {"n": 7}}])
    conn.commit()
    _run(dsn, concurrency=concurrency)
    records = [Store(conn).get_job(job_id) for job_id in ids]
    assert [r.state.value for r in records] == ["completed"] * 5
    assert [r.result for r in records] == [{"sum": 6, "ok": True}, None, "é ünicode", 0,
                                           [7, "async"]]
    assert serialize.job_to_dict(records[0])["result"] == {"sum": 6, "ok": True}


@pytest.mark.parametrize("job_type, says", [
    ("bytes", "not JSON serializable"), ("nan", "Out of range float"),
    ("nul", "NUL"), ("surrogate", "surrogates not allowed"),
    ("big", "over worker.max_result_bytes (1,000)")])
def test_a_result_that_cannot_be_stored_fails_the_attempt_saying_why(dsn, conn, job_type, says):
    job_id = pulsed.enqueue(conn, job_type, max_attempts=1)
    conn.commit()
    _run(dsn)
    record = Store(conn).get_job(job_id)
    assert record.state.value == "failed" and record.result is None
    assert says in record.last_error and "result" in record.last_error
    assert [a.outcome for a in record.attempts] == ["error"]


def _worker_thread(dsn: str) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    worker = Worker(dsn, WorkerOptions(owner="w", poll_interval=0.2), registry=_registry())
    thread = threading.Thread(target=worker.run, kwargs={"should_stop": stop.is_set})
    thread.start()
    return thread, stop


def test_wait_returns_the_finished_job_when_it_ends_not_by_polling(dsn, conn, monkeypatch):
    monkeypatch.setattr(waiting, "RECHECK_S", 30.0)  # only the NOTIFY can end the wait in time
    job_id = pulsed.enqueue(conn, "answer", {"n": [2, 3]}, delay=1.0)
    conn.commit()
    thread, stop = _worker_thread(dsn)
    try:
        # The leader would promote it; here the test does, after the waiter waits.
        def promote() -> None:
            time.sleep(0.3)
            with psycopg.connect(dsn, autocommit=True) as other:
                other.execute("UPDATE pulse_jobs SET state = 'available', run_at = now() "
                              "WHERE id = %s", (job_id,))
                other.execute("NOTIFY pulse_jobs, 'default'")
        threading.Thread(target=promote).start()
        started = time.monotonic()
        record = pulsed.wait(conn, job_id, timeout=10)
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        thread.join(10)
    assert (record.state.value, record.result) == ("completed", {"sum": 5, "ok": True})
    assert conn.execute("SELECT count(*) FROM pulse_job_waiters").fetchone()[0] == 0


def test_wait_times_out_and_names_what_it_waited_for(dsn, conn):
    job_id = pulsed.enqueue(conn, "answer", {"n": [1]})
    conn.commit()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"job {job_id} is still available after 0.3s"):
        pulsed.wait(conn, job_id, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 3
    with pytest.raises(JobNotFound):
        pulsed.wait(conn, 999_999, timeout=0.1)
    with psycopg.connect(dsn) as app:  # an application's connection, in a transaction
        pulsed.enqueue(app, "answer", {"n": [1]})
        with pytest.raises(WaitError, match="outside a transaction"):
            pulsed.wait(app, job_id, timeout=0.1)
        app.commit()  # outside one, it waits (and restores autocommit after)
        with pytest.raises(TimeoutError):
            pulsed.wait(app, job_id, timeout=0.1)
        assert not app.autocommit


def test_wait_sees_failures_and_cancels(dsn, conn):
    failing = pulsed.enqueue(conn, "fail")
    cancelled = pulsed.enqueue(conn, "answer", {"n": [1]}, delay=3600)
    conn.commit()
    _run(dsn)
    assert pulsed.wait(conn, failing, timeout=5).state.value == "failed"

    def cancel() -> None:
        time.sleep(0.2)
        with psycopg.connect(dsn, autocommit=True) as other:
            Store(other).cancel(cancelled)
    threading.Thread(target=cancel).start()
    assert pulsed.wait(conn, cancelled, timeout=5).state.value == "cancelled"


def test_nobody_waiting_means_no_notification(dsn, conn):
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pulse_done")
        pulsed.enqueue_many(conn, [{"type": "answer", "payload": {"n": [1]}}] * 5)
        conn.commit()
        _run(dsn)
        assert list(listener.notifies(timeout=0.3)) == []


def test_http_get_with_wait_answers_when_the_job_ends(dsn, conn):
    job_id = pulsed.enqueue(conn, "answer", {"n": [4]})
    conn.commit()
    config = Config(api=ApiConfig(enabled=True, listen="127.0.0.1:0"))
    with ApiServer(config, dsn) as server:
        thread, stop = _worker_thread(dsn)
        try:
            with urllib.request.urlopen(f"{server.url}/jobs/{job_id}?wait=10", timeout=15) as r:
                body = json.loads(r.read())
        finally:
            stop.set()
            thread.join(10)
        assert (body["state"], body["result"]) == ("completed", {"sum": 4, "ok": True})
        bad = urllib.request.Request(f"{server.url}/jobs/{job_id}?wait=61")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=5)
        assert refused.value.code == 400
        assert "wait must be a number of seconds from 0 to 60" in refused.value.read().decode()


def test_pulsectl_enqueue_wait_prints_the_result_and_exits_by_outcome(dsn, tmp_path: Path,
                                                                      capsys):
    config = tmp_path / "pulse.toml"
    config.write_text(tomli_w.dumps({"database": {"url": dsn},
                                     "daemon": {"state_dir": str(tmp_path / "state")}}))
    thread, stop = _worker_thread(dsn)
    try:
        code = pulsectl_main(["--config", str(config), "enqueue", "answer", '{"n": [5, 6]}',
                              "--wait", "10"])
        out, err = capsys.readouterr()
        assert (code, json.loads(out)) == (0, {"sum": 11, "ok": True}), err
        code = pulsectl_main(["--config", str(config), "enqueue", "fail", "--wait"])
        out, err = capsys.readouterr()
        assert code == 1 and "failed: Fail: no" in err
    finally:
        stop.set()
        thread.join(10)
