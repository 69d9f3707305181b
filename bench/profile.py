"""Where a Pulse drain spends its time: py-spy on one worker, and what the
workers' PostgreSQL backends do (pg_stat_activity sampled every 10 ms).

    .venv/bin/python bench/profile.py --dsn postgresql://bench@127.0.0.1:25432/bench_profile \
        [--jobs 200000] [--seconds 8] [--py-spy /tmp/profvenv/bin/py-spy]

Fills the queue with --jobs available no-op jobs (bulk SQL), starts pulsed
(2 workers, defaults), profiles worker 0 for --seconds once it is busy, and
prints the heaviest frames (self and inclusive) and the backends' states.
Needs py-spy (`pip install py-spy` in any venv) and ptrace rights (root).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

from peers.procs import Workers, children_titles, worker_env
from peers.pulse_load import fill
from peers.pulse_peer import PulseAdapter, reset

STATEMENTS = """SELECT calls, total_exec_time, rows, left(regexp_replace(query, '\\s+', ' ', 'g'), 90)
FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY total_exec_time DESC LIMIT 8"""

WAITS = """SELECT state, coalesce(wait_event_type || ':' || wait_event, 'CPU')
FROM pg_stat_activity WHERE application_name LIKE 'pulse worker%'"""


def sample_backends(dsn: str, stop: threading.Event, out: collections.Counter) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        while not stop.is_set():
            out.update(c.execute(WAITS).fetchall())
            out["_samples"] += 1
            time.sleep(0.01)


def py_spy(binary: str, pid: int, seconds: float, out: Path) -> None:
    subprocess.run([binary, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "250",
                    "--format", "raw", "--nonblocking", "-o", str(out)], check=True,
                   capture_output=True)


def top_frames(raw: Path, n: int = 20) -> str:
    own, incl, total = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        incl.update({f: int(count) for f in set(frames)})
    lines = [f"py-spy, {total} samples; self:"]
    lines += [f"  {v / total:6.1%}  {k}" for k, v in own.most_common(n)]
    lines += ["inclusive:"] + [f"  {v / total:6.1%}  {k}" for k, v in incl.most_common(2 * n)]
    return "\n".join(lines)


def reset_statements(dsn: str) -> bool:
    """Zero pg_stat_statements (bench/pg.sh loads it); False without it."""
    with psycopg.connect(dsn, autocommit=True) as c:
        try:
            c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            c.execute("SELECT pg_stat_statements_reset()")
        except psycopg.Error:
            return False
    return True


def top_statements(dsn: str, elapsed: float) -> list[str]:
    """The statements that used the server's time while profiled: calls,
    server time per call and per row, share of wall time."""
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute(STATEMENTS).fetchall()
    lines = ["pg_stat_statements (calls, ms/call, us/row, % of wall time, query):"]
    for calls, total_ms, nrows, query in rows:
        per_row = total_ms * 1000 / nrows if nrows else 0.0
        lines.append(f"  {calls:7d} {total_ms / calls:7.3f} {per_row:7.1f} "
                     f"{total_ms / 10 / elapsed:5.1f}%  {query}")
    return lines


def first_worker(master: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kids = [p for p, t in children_titles(master).items() if t.startswith("pulsed: worker")]
        if kids:
            return kids[0]
        time.sleep(0.05)
    raise RuntimeError("no worker started")


def profile(a: argparse.Namespace, logdir: Path) -> str:
    reset(a.dsn)
    fill(a.dsn, a.jobs, 0)
    ad = PulseAdapter(argparse.Namespace(dsn=a.dsn, workers=2, concurrency=1))
    workers = Workers(ad.worker_commands(2, 1), worker_env(), logdir)
    waits: collections.Counter = collections.Counter()
    stop = threading.Event()
    try:
        pid = first_worker(workers.procs[0].pid)
        time.sleep(1.0)  # past start-up
        done0 = ad.count_done(0)
        sampler = threading.Thread(target=sample_backends, args=(a.dsn, stop, waits))
        sampler.start()
        statements = reset_statements(a.dsn)
        t0 = time.monotonic()
        py_spy(a.py_spy, pid, a.seconds, logdir / "worker.txt")
        elapsed = time.monotonic() - t0
        rate = (ad.count_done(0) - done0) / elapsed
        statements = top_statements(a.dsn, elapsed) if statements else []
    finally:
        stop.set()
        workers.stop()
    samples = waits.pop("_samples", 1)
    backends = [f"  {v / samples:5.2f}  {state} / {wait}" for (state, wait), v in waits.most_common(10)]
    return "\n".join([f"drain rate while profiled: {rate:,.0f} jobs/s",
                      "worker backends (average number in each state / wait event):", *backends,
                      *statements,
                      top_frames(logdir / "worker.txt")])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", required=True)
    p.add_argument("--jobs", type=int, default=200_000)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--py-spy", default="py-spy")
    a = p.parse_args()
    print(profile(a, Path(tempfile.mkdtemp(prefix="bench-profile-"))))


if __name__ == "__main__":
    sys.exit(main())
