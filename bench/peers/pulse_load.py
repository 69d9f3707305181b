"""W4 backlog and W5 mixed load: Pulse-only workloads.

W4: fill pulse_jobs with --available available jobs (at least --jobs) and
--finished completed rows, VACUUM ANALYZE + CHECKPOINT, start pulsed, and
time the first --jobs completions. Run it with --available 0 --finished 0
for the empty-table figure (bench/harness.py runs both, interleaved).

W5: pulsed with --workers workers; idle for --idle-before seconds (master
and scheduler CPU while idle), then enqueue 1 ms and 50 ms jobs (the share
of 50 ms ones is --slow-fraction, spread evenly) one at a time at --load x
capacity for --duration seconds, where capacity = workers / mean job time.
Reports throughput, enqueue->start latency, master and scheduler CPU (from
/proc/<pid>/stat) and the RSS of the master, the scheduler and each worker.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from peers.driver import LAT_ENV
from peers.procs import Workers, children_titles, cpu_s, rss_bytes, worker_env
from peers.workloads import latency_stats, paced_enqueue, wait_starts, wait_done

FILL_FINISHED = """
INSERT INTO pulse_jobs (type, payload, state, attempt, run_at, lease_owner, created_at,
                        started_at, finished_at)
SELECT 'noop', jsonb_build_object('i', -g), 'completed', 1, t, 'bench/old', t, t, t
FROM generate_series(1, %(n)s) g, LATERAL (SELECT now() - interval '1 hour' AS t) c
"""
FILL_AVAILABLE = """
INSERT INTO pulse_jobs (type, payload, state)
SELECT 'noop', jsonb_build_object('i', g), 'available' FROM generate_series(1, %(n)s) g
"""
FAST_MS, SLOW_MS = 1, 50
WARMUP_JOBS = 10


def fill(dsn: str, available: int, finished: int) -> float:
    """Write the backlog in bulk SQL (not the API: millions of rows), then
    VACUUM ANALYZE and CHECKPOINT; return the seconds taken."""
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(FILL_FINISHED, {"n": finished})
        c.execute(FILL_AVAILABLE, {"n": available})
        c.execute("VACUUM ANALYZE pulse_jobs")
        c.execute("ANALYZE")  # every table, as W1 does (pulse_paused_queues: see README)
        c.execute("CHECKPOINT")
    return time.perf_counter() - t0


async def run_backlog(ad: Any, a: argparse.Namespace, logdir: Path) -> dict:
    await ad.reset()
    res: dict[str, Any] = {"fill_s": fill(a.dsn, max(a.available, a.jobs), a.finished),
                           "available": max(a.available, a.jobs), "finished": a.finished}
    with psycopg.connect(a.dsn) as c:
        since = c.execute("SELECT now()").fetchone()[0]
    count = lambda: ad.scalar("SELECT count(*) FROM pulse_jobs WHERE state = 'completed' "
                              "AND finished_at >= %s", (since,))
    workers = Workers(ad.worker_commands(a.workers, a.concurrency), worker_env(), logdir)
    try:
        drain = wait_done(count, a.jobs, workers, a.timeout, a.poll_interval)
    finally:
        res["worker_exit_codes"] = workers.stop()
    res.update({f"backlog_{k}": v for k, v in drain.items()})
    if not drain["complete"]:
        res.update(failed=True, worker_log_tails=workers.tails())
    return res


def daemon_pids(master: int) -> dict[str, int]:
    """'master', 'scheduler', 'worker-N' -> pid, from the process titles."""
    pids = {"master": master}
    for pid, title in children_titles(master).items():
        words = title.split()
        if title.startswith("pulsed: scheduler"):
            pids["scheduler"] = pid
        elif title.startswith("pulsed: worker"):
            pids[f"worker-{words[2]}"] = pid
    return pids


def cpu_pct(pids: dict[str, int], before: dict[str, float], seconds: float) -> dict[str, float]:
    return {name: 100.0 * (cpu_s(pids[name]) - before[name]) / seconds for name in before}


def rss_report(pids: dict[str, int]) -> dict[str, Any]:
    rss = {k: rss_bytes(pid) / 2**20 for k, pid in pids.items()}
    workers = [v for k, v in rss.items() if k.startswith("worker-")]
    return {"rss_mib_master": rss["master"], "rss_mib_scheduler": rss["scheduler"],
            "rss_mib_workers": workers, "rss_mib_workers_max": max(workers)}


def mixed_specs(n: int, slow_fraction: float) -> list[dict]:
    """n jobs, every 1/slow_fraction-th one slow, evenly spread."""
    slow = [int((i + 1) * slow_fraction) > int(i * slow_fraction) for i in range(n)]
    return [{"i": i, "ms": SLOW_MS if s else FAST_MS} for i, s in enumerate(slow)]


async def warm_up(client: Any, latdir: Path, workers: Workers) -> None:
    for i in range(WARMUP_JOBS):
        client.enqueue_mixed({"i": -1 - i, "ms": 0})
    got = await wait_starts(latdir, {-1 - i for i in range(WARMUP_JOBS)}, workers, 120)
    if len(got) < WARMUP_JOBS:
        raise RuntimeError("warm-up jobs did not run: " + " | ".join(workers.tails()))


async def measure_idle(pids: dict[str, int], seconds: float) -> dict[str, float]:
    before = {k: cpu_s(pids[k]) for k in ("master", "scheduler")}
    await asyncio.sleep(seconds)
    return {f"idle_cpu_pct_{k}": v for k, v in cpu_pct(pids, before, seconds).items()}


def mixed_latencies(specs: list[dict], t_enq: dict[int, float], got: dict[int, float]) -> dict:
    res: dict[str, Any] = {}
    for label, ms in (("all", None), ("fast", FAST_MS), ("slow", SLOW_MS)):
        lats = [(got[s["i"]] - t_enq[s["i"]]) * 1000 for s in specs
                if s["i"] in got and ms in (None, s["ms"])]
        res.update(latency_stats(lats, f"latency_ms_{label}"))
    return res


async def load_phase(ad: Any, a: argparse.Namespace, client: Any, pids: dict[str, int],
                     latdir: Path, workers: Workers) -> dict:
    specs = mixed_specs(int(a.duration * target_rate(a)), a.slow_fraction)
    before = {k: cpu_s(pids[k]) for k in ("master", "scheduler")}
    t0 = time.perf_counter()
    t_enq, _ = await paced_enqueue(client.enqueue_mixed, specs, target_rate(a))
    load_s = time.perf_counter() - t0
    res = {f"load_cpu_pct_{k}": v for k, v in cpu_pct(pids, before, load_s).items()}
    res.update(rss_report(pids))
    done = wait_done(lambda: ad.count_done(0) - WARMUP_JOBS, len(specs), workers, 120)
    got = await wait_starts(latdir, set(range(len(specs))), workers, 5)
    res.update(jobs=len(specs), rate_target=target_rate(a), rate_actual=len(specs) / load_s,
               throughput_jobs_per_s=len(specs) / (load_s + done["wall_s"]),
               backlog_after_s=done["wall_s"], failed=not done["complete"])
    return res | mixed_latencies(specs, t_enq, got)


def target_rate(a: argparse.Namespace) -> float:
    mean_s = (a.slow_fraction * SLOW_MS + (1 - a.slow_fraction) * FAST_MS) / 1000.0
    return a.load * a.workers / mean_s


async def run_mixed(ad: Any, a: argparse.Namespace, logdir: Path) -> dict:
    latdir = Path(tempfile.mkdtemp(prefix="lat-", dir=logdir))
    await ad.reset()
    workers = Workers(ad.worker_commands(a.workers, a.concurrency),
                      worker_env({LAT_ENV: str(latdir)}), logdir)
    client = await ad.open_client()
    try:
        await warm_up(client, latdir, workers)
        pids = daemon_pids(workers.procs[0].pid)
        res = await measure_idle(pids, a.idle_before)
        res.update(await load_phase(ad, a, client, pids, latdir, workers))
    finally:
        client.close()
        res_codes = workers.stop()
    res["worker_exit_codes"] = res_codes
    if res.get("failed"):
        res["worker_log_tails"] = workers.tails()
    return res
