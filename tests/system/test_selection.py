"""Type-based selection under real daemons: limits, rate, aging, pause."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

import pulsed
from tests.pg import wait_until

pytestmark = pytest.mark.timeout(180)


def _spans(folder: Path) -> list[tuple[float, float]]:
    spans = []
    for path in folder.glob("*.span"):
        text = path.read_text().split()
        if len(text) == 2:
            spans.append((float(text[0]), float(text[1])))
    return sorted(spans)


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans],
                    key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def _completed(conn: psycopg.Connection, job_type: str) -> int:
    return conn.execute("SELECT count(*) FROM pulse_jobs WHERE type = %s AND state = "
                        "'completed'", (job_type,)).fetchone()[0]


def test_type_concurrency_holds_across_two_daemons(daemon_factory, conn, marks):
    config = {"types": {"limited": {"concurrency": 3}}}
    daemons = [daemon_factory(name, workers=4, config=config).start() for name in "ab"]
    for daemon in daemons:
        daemon.wait_ready()
    pulsed.enqueue_many(conn, [{"type": "limited", "payload": {"s": 0.05, "dir": str(marks)}}
                               for _ in range(200)])
    wait_until(lambda: _completed(conn, "limited") == 200, timeout=90,
               message="the limited jobs did not all complete")
    spans = _spans(marks)
    assert len(spans) == 200
    peak = _max_overlap(spans)
    print(f"max running at once: {peak} (limit 3)")
    assert peak == 3


def test_rate_limit_holds_within_ten_percent(daemon_factory, conn, marks):
    """Never more than 10% over the rate. Under it by more than 10% only on a
    stalled machine: the bucket holds 100 ms of tokens (0002_type_limits),
    and a token no claim takes before the bucket is full is lost (CI once
    started 173 in the window, its two cores busy with 8 workers' fsyncs)."""
    daemon = daemon_factory(workers=8, config={"types": {"rated": {"rate": "20/s"}}}).start()
    daemon.wait_ready()
    pulsed.enqueue_many(conn, [{"type": "rated", "payload": {"dir": str(marks)}}
                               for _ in range(400)])
    wait_until(lambda: len(list(marks.glob("*.span"))) >= 40, timeout=20)
    window_start = min(s for s, _ in _spans(marks)) + 1.0  # past the initial burst
    window_end = window_start + 10.0
    wait_until(lambda: any(s >= window_end for s, _ in _spans(marks)), timeout=30)
    started = sum(1 for s, _ in _spans(marks) if window_start <= s < window_end)
    print(f"started in 10 s at 20/s: {started}")
    assert 160 <= started <= 220


def test_aging_runs_a_low_priority_job_under_a_stream_of_urgent_ones(
        daemon_factory, conn, dsn, marks):
    aging = 2.0
    daemon = daemon_factory(workers=1, config={"worker": {"aging": aging}}).start()
    daemon.wait_ready()
    stop = threading.Event()

    def feed() -> None:  # more urgent work than one worker can do
        with psycopg.connect(dsn, autocommit=True) as feeder:
            while not stop.is_set():
                pulsed.enqueue_many(feeder, [{"type": "timed", "priority": 0,
                                              "payload": {"s": 0.02}}] * 10)
                stop.wait(0.1)

    thread = threading.Thread(target=feed)
    thread.start()
    try:
        wait_until(lambda: conn.execute("SELECT count(*) FROM pulse_jobs WHERE state = "
                                        "'available'").fetchone()[0] > 50, timeout=10)
        enqueued = time.time()
        job_id = pulsed.enqueue(conn, "timed", {"dir": str(marks)}, priority=10)
        wait_until(lambda: list(marks.glob(f"{job_id}.*.span")), timeout=aging + 10,
                   message="the priority-10 job starved")
        started = _spans(marks)[0][0]
    finally:
        stop.set()
        thread.join()
    waited = started - enqueued
    print(f"priority-10 job waited {waited:.2f}s (aging bound {aging}s)")
    assert waited <= aging + 1.5
    backlog = conn.execute("SELECT count(*) FROM pulse_jobs WHERE state = 'available' "
                           "AND priority = 0").fetchone()[0]
    assert backlog > 0, "the urgent stream never outran the worker: nothing was tested"


def test_pausing_a_queue_stops_claims_on_every_host(daemon_factory, conn, marks):
    daemons = [daemon_factory(name, workers=2).start() for name in "ab"]
    for daemon in daemons:
        daemon.wait_ready()
    ctl = [sys.executable, "-m", "pulsectl", "--config", str(daemons[0].config_path)]
    paused = subprocess.run([*ctl, "queue", "pause", "reports"], capture_output=True,
                            text=True, timeout=30)
    assert paused.returncode == 0, paused.stderr
    ids = pulsed.enqueue_many(conn, [{"type": "timed", "queue": "reports",
                                      "payload": {"dir": str(marks)}}] * 20)
    other = pulsed.enqueue(conn, "timed", {"dir": str(marks)}, queue="default")
    wait_until(lambda: list(marks.glob(f"{other}.*.span")), timeout=10,
               message="the default queue stopped too")
    deadline = time.monotonic() + 1.5  # a window in which a claim would show
    while time.monotonic() < deadline:
        assert not any(list(marks.glob(f"{i}.*.span")) for i in ids)
        time.sleep(0.1)
    assert "reports" in daemons[1].status()["paused_queues"] or wait_until(
        lambda: "reports" in daemons[1].status()["paused_queues"], timeout=3)

    resumed = subprocess.run([*ctl, "queue", "resume", "reports"], capture_output=True,
                             text=True, timeout=30)
    assert resumed.returncode == 0, resumed.stderr
    wait_until(lambda: all(list(marks.glob(f"{i}.*.span")) for i in ids), timeout=15,
               message="resume did not restore claims")
