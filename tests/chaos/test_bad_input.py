"""Bad input where it enters Pulse: payloads (the Python API and pulsectl)
and handlers that fail in every nasty way. A bad payload gets a clear
JobInputError naming `payload` and writes nothing (the caller's
transaction stays usable); a nasty handler gets a recorded outcome in the
attempt history, the job is retried or failed per its attempts, and the
daemon carries on running other jobs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import psycopg
import pytest
import tomli_w

import pulsed
from pulsed.api import MAX_PAYLOAD_BYTES
from pulsed.db.store import Store
from tests.chaos.harness import (StatusWatch, account, accounting_fields, check_accounting,
                                 enqueue_load, settle)
from tests.pg import wait_until
from tests.system.daemon import REPO, pid_alive

pytestmark = pytest.mark.timeout(180)


def _nested(depth: int) -> dict:
    payload: dict = {}
    inner = payload
    for _ in range(depth):
        inner["a"] = {}
        inner = inner["a"]
    return payload


class _NotJson:
    pass


BAD_PAYLOADS = {
    "list": [1, 2, 3],
    "string": "hello",
    "number": 42,
    "float": 3.5,
    "bool": True,
    "bytes": b"{}",
    "set": {1, 2},
    "object": _NotJson(),
    "nested object": {"a": _NotJson()},
    "nan": {"x": math.nan},
    "infinity": {"x": math.inf},
    "nul character": {"x": "a\x00b"},
    "lone surrogate": {"x": "caf\udce9"},
    "nested 5,000 deep": _nested(5000),
    "huge (limit + 1 byte)": {"x": "y" * (MAX_PAYLOAD_BYTES - 9 + 1)},
    "huge (20 MB)": {"x": "y" * 20_000_000},
}


def _count(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pulse_jobs").fetchone()[0]


@pytest.mark.parametrize("name", list(BAD_PAYLOADS))
def test_bad_payload_is_refused_clearly_and_writes_nothing(conn, name):
    payload = BAD_PAYLOADS[name]
    before = _count(conn)
    with conn.transaction():  # the application's own transaction
        with pytest.raises(pulsed.JobInputError) as raised:
            pulsed.enqueue(conn, "noop", payload)
        # The caller's transaction is still usable: the check ran before any SQL.
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert raised.value.argument == "payload", raised.value
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 500, str(raised.value)[:600]
    with pytest.raises(pulsed.JobInputError) as many:
        pulsed.enqueue_many(conn, [{"type": "noop", "payload": {}}] * 3
                            + [{"type": "noop", "payload": payload}])
    assert many.value.argument == "jobs[3].payload", many.value
    assert _count(conn) == before, "a refused payload left rows behind"


def test_payload_at_the_limit_is_accepted(conn):
    exact = {"x": "y" * (MAX_PAYLOAD_BYTES - 9)}  # {"x": "…"} is 9 bytes of JSON around it
    assert len(json.dumps(exact).encode()) == MAX_PAYLOAD_BYTES
    job_id = pulsed.enqueue(conn, "noop", exact)
    assert Store(conn).get_job(job_id).payload == exact


@pytest.mark.parametrize("text,problem", [
    ("[1, 2]", "must be a JSON object"),
    ('"just a string"', "must be a JSON object"),
    ("{not json", "not valid JSON"),
    ("[" * 100_000, "not valid JSON"),
    (json.dumps({"x": "y" * MAX_PAYLOAD_BYTES}), f"the limit is {MAX_PAYLOAD_BYTES}"),
])
def test_pulsectl_enqueue_refuses_bad_payloads(dsn, conn, tmp_path, text, problem):
    config = tmp_path / "pulse.toml"
    config.write_text(tomli_w.dumps({"database": {"url": dsn}}))
    before = _count(conn)
    done = subprocess.run([sys.executable, "-m", "pulsectl", "--config", str(config),
                           "enqueue", "noop", "-"], input=text, capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert problem in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert _count(conn) == before


# -- handlers that fail badly, against a real daemon --------------------------------------------

# type -> (the outcome each attempt must record, words its message must contain)
NASTY = {
    "raise_unpicklable": ("error", "cannot be pickled"),
    "raise_unprintable": ("error", "Unprintable"),
    "raise_nul": ("error", "bad frame"),
    "raise_surrogate": ("error", "cannot open caf"),
    "raise_huge": ("error", "RuntimeError: xxxx"),
    "exit3": ("worker_died", "exited with status 3"),
    "segfault": ("worker_died", "signal 11"),
    # sys.exit() in a handler fails that attempt; the worker lives on.
    "sys_exit": ("error", "SystemExit"),
    # raised by the handler itself: a failure too (it ended the worker, and
    # the master gave the job back unstarted, for ever)
    "raise_keyboard_interrupt": ("error", "KeyboardInterrupt"),
    # jsonb refuses it: the attempt fails (the batch's write failed, and the
    # worker with it)
    "return_huge_int": ("error", "holds an integer"),
}
ATTEMPTS = 2


# At concurrency 4 (handlers on threads) only the handlers the worker
# outlives: one that kills its process takes its siblings' attempts with it.
@pytest.mark.parametrize(("concurrency", "kinds"), [
    (1, NASTY), (4, {t: v for t, v in NASTY.items() if v[0] == "error"})])
def test_nasty_handlers_get_recorded_outcomes_and_the_daemon_carries_on(daemon_factory, conn,
                                                                        marks, record,
                                                                        concurrency, kinds):
    daemon = daemon_factory(workers=2, config={"worker": {"concurrency": concurrency}}).start()
    daemon.wait_ready()
    watch = StatusWatch(daemon, interval=0.5)
    watch.start()
    nasty = {t: pulsed.enqueue(conn, t, {"dir": str(marks)}, max_attempts=ATTEMPTS)
             for t in kinds}
    time.sleep(0.5)
    good = enqueue_load(conn.info.dsn, 200, "work", s=0.01, dir=str(marks))

    def finished() -> bool:
        states = {Store(conn).get_job(i, with_attempts=False).state.value
                  for i in nasty.values()}
        return states <= {"failed", "completed", "cancelled"}

    wait_until(finished, timeout=90, interval=0.2,
               message=f"every nasty job finished; log:\n{daemon.log_tail(60)}")
    took = settle(conn.info.dsn, good, timeout=60)
    watch.stop()
    acc = account(conn.info.dsn, good, marks)
    seen = {}
    for job_type, job_id in nasty.items():
        job = Store(conn).get_job(job_id)
        seen[job_type] = {"state": job.state.value,
                          "attempts": [(a.outcome, a.error_class, (a.error_message or "")[:80])
                                       for a in job.attempts]}
    record(fault="nasty handlers: unpicklable/unprintable/NUL/surrogate/5 MB exceptions, "
                 "os._exit(3), SIGSEGV, sys.exit, KeyboardInterrupt, a result jsonb refuses",
           load=f"{len(kinds)} nasty jobs x {ATTEMPTS} attempts among 200 x 10 ms jobs, "
                f"2 workers at concurrency {concurrency}",
           recovery_s=None, settle_s=round(took, 3), restarts=watch.restarts,
           # exit3 and segfault end their process
           expected_restarts=2 * ATTEMPTS if "exit3" in kinds else 0,
           outcomes=seen, **accounting_fields(acc))

    check_accounting(acc, "good jobs next to nasty ones")
    problems = []
    for job_type, (outcome, words) in kinds.items():
        got = seen[job_type]
        if got["state"] != "failed" or len(got["attempts"]) != ATTEMPTS:
            problems.append(f"{job_type}: {got}")
            continue
        for attempt_outcome, error_class, message in got["attempts"]:
            if attempt_outcome != outcome or words not in message or not error_class:
                problems.append(f"{job_type}: expected {outcome} with {words!r}, got "
                                f"{(attempt_outcome, error_class, message)}")
    assert not problems, "\n".join(problems)
    assert pid_alive(daemon.pid) and watch.master_pids == {daemon.pid}
    assert not watch.failures
    wait_until(lambda: len(daemon.workers()) == 2, timeout=40,
               message="both workers back after the crashes")
    # Only the handlers that kill their process may cost a worker.
    assert watch.total_restarts <= (2 * ATTEMPTS if "exit3" in kinds else 0), watch.restarts
