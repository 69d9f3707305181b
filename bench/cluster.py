"""Many nodes, one PostgreSQL: a measured cluster on one machine.

    python bench/cluster.py --dsn postgresql://postgres@127.0.0.1/bench_cluster \
        --nodes 10 --workers 2 --jobs 20000 --kills 20

Runs, in order, with real `pulsed` daemons (each its own node id):
1. throughput: drain --jobs no-op jobs with one node, then with --nodes nodes;
2. limits: 200 jobs of a type limited to 3 at once and 200 of a type limited
   to 20/s, drained by every node: the most ever running at once, and the
   most started in any one second, sampled from the database;
3. failover: --kills times, kill -9 the leader's master and time until
   another node leads (the killed node is started again);
4. cron: an `every = "1s"` entry (catch_up on) over the whole run: ticks
   doubled (must be 0) and missed (must be 0).
Prints a report (and --json writes it). A tool, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import psycopg
import tomli_w

import pulsed
from pulsed.db.migrate import migrate

HERE = Path(__file__).resolve().parent
LEADER_TTL = 3.0


class Node:
    def __init__(self, root: Path, dsn: str, index: int, workers: int) -> None:
        self.root = root / f"node-{index}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.node_id = f"node-{index}"
        config = {
            "database": {"url": dsn},
            "daemon": {"state_dir": str(self.root / "state"), "workers": workers,
                       "node_id": self.node_id, "stop_timeout": 5,
                       "socket": tempfile.mkdtemp(prefix="pc-") + "/s"},
            "worker": {"handlers": ["cluster_jobs"], "pythonpath": [str(HERE)],
                       "lease_ttl": 5},
            "scheduler": {"leader_ttl": LEADER_TTL, "interval": 0.2},
            "api": {"enabled": False},
            "types": {"limited": {"concurrency": 3}, "rated": {"rate": "20/s"}},
            "cron": [{"name": "tick", "type": "tick", "every": "1s", "catch_up": True}],
        }
        (self.root / "pulse.toml").write_text(tomli_w.dumps(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.root / "pulsed.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pulsed", "--config", str(self.root / "pulse.toml")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def wait(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


def count(conn: psycopg.Connection, sql: str, *args) -> int:
    return conn.execute(sql, args).fetchone()[0]


def workers_up(conn: psycopg.Connection, nodes: int, workers: int) -> bool:
    return count(conn, "SELECT count(*) FROM pulse_processes WHERE role = 'worker' AND "
                       "heartbeat_at > now() - interval '10 s'") >= nodes * workers


def drain(conn: psycopg.Connection, jobs: int) -> float:
    """Enqueue `jobs` no-ops in one transaction; seconds until all completed."""
    conn.execute("DELETE FROM pulse_jobs WHERE type = 'noop'")
    with conn.transaction():
        pulsed.enqueue_many(conn, [{"type": "noop"} for _ in range(jobs)])
    began = time.monotonic()
    wait(lambda: count(conn, "SELECT count(*) FROM pulse_jobs WHERE type = 'noop' AND "
                             "state <> 'completed'") == 0, 600, "the drain")
    return time.monotonic() - began


def limits(conn: psycopg.Connection) -> dict[str, int]:
    with conn.transaction():
        pulsed.enqueue_many(conn, [{"type": "limited"} for _ in range(200)]
                            + [{"type": "rated"} for _ in range(200)])
    most_running = 0
    while count(conn, "SELECT count(*) FROM pulse_jobs WHERE type IN ('limited', 'rated') "
                      "AND state <> 'completed'"):
        most_running = max(most_running, count(
            conn, "SELECT count(*) FROM pulse_jobs WHERE type = 'limited' AND state = 'running'"))
        time.sleep(0.01)
    per_second = count(conn, """
        SELECT coalesce(max(n), 0) FROM (
          SELECT count(*) AS n FROM pulse_jobs WHERE type = 'rated'
          GROUP BY date_trunc('second', started_at)) s""")
    return {"limited_most_running": most_running, "limited_allowed": 3,
            "rated_most_per_second": per_second, "rated_allowed": 20}


def leader(conn: psycopg.Connection) -> str | None:
    row = conn.execute("SELECT leader_id FROM pulse_leader WHERE expires_at > now()").fetchone()
    return row[0] if row else None


def failover(conn: psycopg.Connection, nodes: list[Node], kills: int) -> list[float]:
    times = []
    by_id = {n.node_id: n for n in nodes}
    for _ in range(kills):
        old = wait(lambda: leader(conn), 30, "a leader")
        victim = by_id[old.rsplit("/", 1)[0]]
        began = time.monotonic()
        victim.kill9()
        new = wait(lambda: (leader(conn) or old) != old and leader(conn), 60, "a new leader",
                   interval=0.01)
        times.append(time.monotonic() - began)
        print(f"  leader {old} killed; {new} leads after {times[-1]:.2f}s", flush=True)
        victim.start()
        wait(lambda: count(conn, "SELECT count(*) FROM pulse_processes WHERE node_id = %s "
                                 "AND role = 'worker' AND heartbeat_at > now() - "
                                 "interval '5 s'", victim.node_id) >= 1, 60, "the restart")
    return times


def cron(conn: psycopg.Connection) -> dict[str, int]:
    """The first tick row is the schedule's start (no job: catch-up counts
    from there); every later second must have exactly one job."""
    rows = conn.execute("SELECT tick, job_id FROM pulse_cron_ticks WHERE name = 'tick' "
                        "ORDER BY tick").fetchall()
    ticks = [tick for tick, _ in rows]
    jobs = count(conn, "SELECT count(*) FROM pulse_jobs WHERE type = 'tick'")
    enqueued = sum(1 for _, job_id in rows[1:] if job_id is not None)
    gaps = sum(int((b - a) / timedelta(seconds=1)) - 1 for a, b in zip(ticks, ticks[1:]))
    return {"ticks": len(rows) - 1, "jobs": jobs, "doubled": jobs - enqueued,
            "missed": gaps + (len(rows) - 1 - enqueued)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pulse-cluster-"))
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        migrate(conn)
        conn.execute("TRUNCATE pulse_jobs, pulse_job_attempts, pulse_cron_ticks, "
                     "pulse_processes, pulse_leader CASCADE")
        nodes = [Node(root, args.dsn, i, args.workers) for i in range(1, args.nodes + 1)]
        report: dict = {"nodes": args.nodes, "workers_per_node": args.workers, "jobs": args.jobs}
        try:
            nodes[0].start()
            wait(lambda: workers_up(conn, 1, args.workers), 60, "one node")
            one = drain(conn, args.jobs)
            for node in nodes[1:]:
                node.start()
            wait(lambda: workers_up(conn, args.nodes, args.workers), 120, "every node")
            many = drain(conn, args.jobs)
            report["throughput"] = {"one_node_jobs_s": round(args.jobs / one),
                                    "cluster_jobs_s": round(args.jobs / many),
                                    "ratio": round(one / many, 2)}
            print(f"throughput: 1 node {args.jobs / one:.0f} jobs/s, {args.nodes} nodes "
                  f"{args.jobs / many:.0f} jobs/s ({one / many:.2f}x)", flush=True)
            report["limits"] = limits(conn)
            print(f"limits: {report['limits']}", flush=True)
            times = failover(conn, nodes, args.kills)
            report["failover_s"] = {"median": round(statistics.median(times), 2),
                                    "max": round(max(times), 2), "leader_ttl": LEADER_TTL,
                                    "all": [round(t, 2) for t in times]}
            report["cron"] = cron(conn)
            print(f"failover: median {statistics.median(times):.2f}s, max {max(times):.2f}s "
                  f"(leader_ttl {LEADER_TTL:g}s); cron: {report['cron']}", flush=True)
        finally:
            for node in nodes:
                node.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
