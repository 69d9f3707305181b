"""A smoke run of the benchmark harness (bench/harness.py), so it cannot rot.

W1 with 50 jobs, one repetition, only the Pulse driver (no peers needed),
against this test's database. Nothing here is timed: the harness's numbers
are for bench/README.md, not for assertions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psycopg

import pulsed

REPO = Path(__file__).resolve().parents[2]


def test_harness_w1_smoke(dsn: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "harness.py"), "w1", "--jobs", "50",
         "--repeat", "1", "--peers", "pulse", "--dsn", dsn, "--results", str(tmp_path)],
        capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]

    [result] = tmp_path.glob("*-w1.json")
    data = json.loads(result.read_text())
    [run] = data["runs"]
    assert run["config"] == "pulse" and run["exit_code"] == 0
    assert run["metrics"]["drain_done"] == 50
    assert run["metrics"]["enqueue_single_jobs_per_s"] > 0
    assert data["summary"]["configs"]["pulse"]["ok_runs"] == 1
    assert "| pulse | 1/1 |" in result.with_suffix(".md").read_text()


def test_harness_w6_smoke(dsn: str, tmp_path: Path) -> None:
    """W6 (I/O-bound jobs) with 20 jobs: both Pulse configs, the `async def`
    handler on the event loop and the plain `def` one on threads."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "harness.py"), "w6", "--jobs", "20",
         "--repeat", "1", "--peers", "pulse-asyncio,pulse-threads", "--dsn", dsn,
         "--results", str(tmp_path)],
        capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]

    [result] = tmp_path.glob("*-w6.json")
    data = json.loads(result.read_text())
    assert [r["config"] for r in data["runs"]] == ["pulse-asyncio", "pulse-threads"]
    for run in data["runs"]:
        assert run["exit_code"] == 0 and run["metrics"]["drain_done"] == 20
        assert run["params"]["concurrency"] == 50 and run["metrics"]["io_slots"] == 100
    assert "event loop" in data["runs"][0]["worker_model"]
    assert "threads" in data["runs"][1]["worker_model"]
    assert "| pulse-threads |" in result.with_suffix(".md").read_text()


def test_harness_w7_smoke(dsn: str, tmp_path: Path) -> None:
    """W7 (POST /jobs over HTTP to a real pulsed) scaled down to 64 requests
    a phase: every answer 201 and every job in the table, or the run fails."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "harness.py"), "w7", "--jobs", "64",
         "--repeat", "1", "--dsn", dsn, "--results", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    [result] = tmp_path.glob("*-w7.json")
    data = json.loads(result.read_text())
    [run] = data["runs"]
    assert run["config"] == "pulse-http" and run["exit_code"] == 0, run.get("stderr_tail")
    metrics = run["metrics"]
    assert metrics["single_p50_ms"] > 0 and metrics["c32_jobs_per_s"] > 0
    assert metrics["bulk_jobs_per_s"] > 0 and metrics["c32_404_per_s"] > 0
    assert "| pulse-http | 1/1 |" in result.with_suffix(".md").read_text()


def test_ceiling_scripts_are_pulses_statements_with_every_parameter_filled() -> None:
    """W3 builds pgbench scripts from queries.sql: a renamed or new
    parameter must fail here, not in the next benchmark run."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import ceiling
    finally:
        sys.path.remove(str(REPO / "bench"))
    for batch, one_txn in ceiling.VARIANTS.values():
        text = ceiling.script(batch, one_txn)
        assert "%(" not in text
        assert "UPDATE pulse_jobs j" in text and f"LIMIT {batch}" in text


def test_a_second_run_the_same_day_keeps_the_first_runs_files(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import harness
    finally:
        sys.path.remove(str(REPO / "bench"))
    first = harness.free_stem(tmp_path, "2026-11-29-w4")
    assert first == tmp_path / "2026-11-29-w4"
    first.with_suffix(".json").write_text("{}")
    second = harness.free_stem(tmp_path, "2026-11-29-w4")
    assert second == tmp_path / "2026-11-29-w4-2"
    second.with_suffix(".md").write_text("")
    assert harness.free_stem(tmp_path, "2026-11-29-w4") == tmp_path / "2026-11-29-w4-3"


def _completed_counter(conn: psycopg.Connection):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from peers.pulse_peer import CompletedCounter
    finally:
        sys.path.remove(str(REPO / "bench"))
    return CompletedCounter(conn)


def _complete(conn: psycopg.Connection, job_id: int) -> None:
    conn.execute("UPDATE pulse_jobs SET state = 'completed', finished_at = now() "
                 "WHERE id = %s", (job_id,))


def _wait_past(conn: psycopg.Connection, moment) -> None:
    while conn.execute("SELECT clock_timestamp() < %s", (moment,)).fetchone()[0]:
        time.sleep(0.01)


def test_w1s_done_count_still_counts_a_completion_committed_late(dsn: str) -> None:
    """W1 counts each completed row once: rows finished before every open
    transaction began are counted for good. A completion whose transaction
    began before a poll and committed after it must still be counted, so
    the count may not settle past an open transaction's start."""
    with psycopg.connect(dsn, autocommit=True) as setup:
        first, second, third = pulsed.enqueue_many(setup, [{"type": "t"}] * 3)
    with psycopg.connect(dsn, autocommit=True) as monitor, psycopg.connect(dsn) as late, \
            psycopg.connect(dsn, autocommit=True) as other:
        counter = _completed_counter(monitor)
        assert counter.count() == 0
        _complete(late, first)  # its transaction stays open
        began = late.execute("SELECT now()").fetchone()[0]
        # Polls after its start plus the margin would settle past it.
        margin = other.execute("SELECT %s::interval", (counter.MARGIN,)).fetchone()[0]
        _wait_past(other, began + 2 * margin)
        _complete(other, second)
        assert counter.count() == 1
        assert counter.count() == 1
        late.commit()
        assert counter.count() == 2
        _complete(other, third)
        _wait_past(other, other.execute("SELECT clock_timestamp()").fetchone()[0] + 2 * margin)
        assert counter.count() == 3
        assert counter.settled == 3  # every row now counted for good, none read again
        assert counter.count() == 3
