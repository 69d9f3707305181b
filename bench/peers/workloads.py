"""W1 drain and W2 pickup latency, for any Adapter.

W1: reset; enqueue N no-op jobs one call (one transaction) at a time on one
connection (single-row enqueue rate); empty the queue and enqueue the same N
with the batch API in chunks (bulk rate; these are the jobs drained);
ANALYZE + CHECKPOINT; start the workers; poll the done count every 0.1 s
until all N are done. drain_jobs_per_s counts from the spawn (start-up
included), drain_jobs_per_s_after_first from the first completed job.

W2: start the workers, run 10 warm-up jobs, idle, then enqueue --jobs jobs
one at a time at --rate jobs/s. Each job appends its start time to a file
(driver.record_start); latency = that minus time.time() just before the
enqueue call, so it includes the enqueue's commit, the wake-up and the claim.

W6 (io): reset; enqueue N jobs that each wait --io-ms (default 50 ms) with
the batch API (chunks of --batch-size); ANALYZE + CHECKPOINT; start the
workers; poll the done count as W1 does. The limit is io_slots() jobs at
once, each --io-ms long: drain_pct_of_limit is the drain rate (start-up
included) against it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from peers.driver import LAT_ENV, Adapter, maybe_await
from peers.procs import Workers, children_cpu_s, machine_jiffies, worker_env

SERIES_EVERY_S = 1.0
POLL_S = 0.1
WARMUP_JOBS = 10


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def latency_stats(ms: list[float], prefix: str = "latency_ms") -> dict[str, float]:
    return {f"{prefix}_p50": percentile(ms, 50), f"{prefix}_p95": percentile(ms, 95),
            f"{prefix}_p99": percentile(ms, 99), f"{prefix}_max": max(ms, default=float("nan")),
            f"{prefix}_mean": statistics.fmean(ms) if ms else float("nan")}


async def enqueue_all(ad: Adapter, a: argparse.Namespace) -> dict[str, float]:
    """The single-row, then the bulk enqueue of N noop jobs; returns rates."""
    payloads = [{"i": i} for i in range(a.jobs)]
    res: dict[str, float] = {}
    client = await ad.open_client()
    try:
        single = payloads[:a.single_jobs or a.jobs]
        t0 = time.perf_counter()
        for p in single:
            await maybe_await(client.enqueue(p))
        res["enqueue_single_jobs_per_s"] = len(single) / (time.perf_counter() - t0)
        if ad.has_batch:
            await ad.clear()
            t0 = time.perf_counter()
            for k in range(0, a.jobs, a.batch_size):
                await maybe_await(client.enqueue_batch(payloads[k:k + a.batch_size]))
            res["enqueue_batch_jobs_per_s"] = a.jobs / (time.perf_counter() - t0)
    finally:
        await maybe_await(client.close())
    return res


def wait_done(count: Callable[[], int], n: int, workers: Workers, timeout: float,
              poll_s: float = POLL_S) -> dict[str, Any]:
    """Poll count() every poll_s until it reaches n; times are relative to
    the call (start-up is read off the first poll that sees a job done: its
    resolution is poll_s)."""
    t_spawn = time.perf_counter()
    t_first = None
    done = 0
    series: list[tuple[float, int]] = []  # (s since spawn, done), about once a second
    while True:
        done = count()
        now = time.perf_counter()
        if done and t_first is None:
            t_first = now
        if not series or now - t_spawn - series[-1][0] >= SERIES_EVERY_S:
            series.append((round(now - t_spawn, 2), done))
        if done >= n or now - t_spawn > timeout or not workers.any_alive():
            break
        time.sleep(poll_s)
    res: dict[str, Any] = {"done": done, "complete": done >= n, "wall_s": now - t_spawn,
                           "jobs_per_s": done / (now - t_spawn)}
    if t_first is not None and now > t_first:
        res["startup_s"] = t_first - t_spawn
        res["jobs_per_s_after_first"] = done / (now - t_first)
    series.append((round(now - t_spawn, 2), done))
    res["series"] = series
    res.update(segment_rates(series, n))
    return res


def segment_rates(series: list[tuple[float, int]], n: int) -> dict[str, float]:
    """Drain rate over the first and the last fifth of the jobs (does the
    rate hold as the table fills with finished rows?)."""
    def rate(lo: int, hi: int) -> float | None:
        start = next(((t, d) for t, d in series if d >= lo), None)
        end = next(((t, d) for t, d in series if d >= hi), None)
        if start is None or end is None or end[0] <= start[0]:
            return None
        return (end[1] - start[1]) / (end[0] - start[0])
    out = {"jobs_per_s_first_fifth": rate(1, n // 5), "jobs_per_s_last_fifth": rate(n - n // 5, n)}
    return {k: v for k, v in out.items() if v is not None}


async def run_drain(ad: Adapter, a: argparse.Namespace, logdir: Path) -> dict:
    await ad.reset()
    res: dict[str, Any] = await enqueue_all(ad, a)
    return drain_workers(ad, a, logdir, res)


def drain_workers(ad: Adapter, a: argparse.Namespace, logdir: Path,
                  res: dict[str, Any]) -> dict[str, Any]:
    """Start the workers on the enqueued backlog and time them until every
    job is done (W1, W6): the drain figures, worker CPU, machine load."""
    ad.before_drain()
    if ad.count_done(a.jobs):
        raise RuntimeError("jobs were done before the workers started")
    cpu0, (busy0, tot0) = children_cpu_s(), machine_jiffies()
    workers = Workers(ad.worker_commands(a.workers, a.concurrency), worker_env(), logdir)
    try:
        drain = wait_done(lambda: ad.count_done(a.jobs), a.jobs, workers, a.timeout,
                          a.poll_interval)
        busy1, tot1 = machine_jiffies()
    finally:
        res["worker_exit_codes"] = workers.stop()
    res.update({f"drain_{k}": v for k, v in drain.items()})
    res["worker_cpu_s"] = children_cpu_s() - cpu0
    res["machine_cpu_busy_pct"] = 100.0 * (busy1 - busy0) / max(1, tot1 - tot0)
    if not drain["complete"]:
        res.update(failed=True, worker_log_tails=workers.tails())
    return res


async def run_io(ad: Adapter, a: argparse.Namespace, logdir: Path) -> dict:
    await ad.reset()
    payloads = [{"i": i, "ms": a.io_ms} for i in range(a.jobs)]
    client = await ad.open_client()
    try:
        t0 = time.perf_counter()
        for k in range(0, a.jobs, a.batch_size):
            await maybe_await(client.enqueue_io_batch(payloads[k:k + a.batch_size]))
        res: dict[str, Any] = {"enqueue_batch_jobs_per_s": a.jobs / (time.perf_counter() - t0)}
    finally:
        await maybe_await(client.close())
    slots = ad.io_slots()
    res.update(io_slots=slots, io_ms=a.io_ms)
    if slots:
        res["limit_jobs_per_s"] = slots / (a.io_ms / 1000.0)
    res = drain_workers(ad, a, logdir, res)
    if slots and "drain_jobs_per_s" in res:
        res["drain_pct_of_limit"] = 100.0 * res["drain_jobs_per_s"] / res["limit_jobs_per_s"]
    return res


def read_starts(d: Path) -> dict[int, float]:
    """Job number -> first recorded start time (a retry would add a line)."""
    out: dict[int, float] = {}
    for f in d.glob("*.txt"):
        for line in f.read_text().splitlines():
            i, t = line.split()
            out.setdefault(int(i), float(t))
    return out


async def wait_starts(latdir: Path, want: set[int], workers: Workers, timeout: float) -> dict[int, float]:
    deadline = time.monotonic() + timeout
    while True:
        got = read_starts(latdir)
        if want <= got.keys() or time.monotonic() > deadline or not workers.any_alive():
            return got
        await asyncio.sleep(POLL_S)


async def paced_enqueue(send, specs: list[Any], rate: float) -> tuple[dict[int, float], list[float]]:
    """Call send(spec) for spec i at t0 + i/rate; return enqueue times by
    index (time.time() just before each call) and each call's duration."""
    t_enq: dict[int, float] = {}
    call_s: list[float] = []
    t0 = time.perf_counter()
    for i, spec in enumerate(specs):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t_enq[i] = time.time()
        c0 = time.perf_counter()
        await maybe_await(send(spec))
        call_s.append(time.perf_counter() - c0)
    return t_enq, call_s


async def run_latency(ad: Adapter, a: argparse.Namespace, logdir: Path) -> dict:
    latdir = Path(tempfile.mkdtemp(prefix="lat-", dir=logdir))
    await ad.reset()
    workers = Workers(ad.worker_commands(a.workers, a.concurrency),
                      worker_env({LAT_ENV: str(latdir)}), logdir)
    client = await ad.open_client()
    try:
        for i in range(WARMUP_JOBS):
            await maybe_await(client.enqueue_latency({"i": -1 - i}))
        warm = await wait_starts(latdir, {-1 - i for i in range(WARMUP_JOBS)}, workers, 120)
        if len(warm) < WARMUP_JOBS:
            raise RuntimeError("warm-up jobs did not run: " + " | ".join(workers.tails()))
        await asyncio.sleep(a.idle_before)
        t0 = time.perf_counter()
        t_enq, call_s = await paced_enqueue(client.enqueue_latency, [{"i": i} for i in range(a.jobs)], a.rate)
        rate = a.jobs / (time.perf_counter() - t0)
        got = await wait_starts(latdir, set(range(a.jobs)), workers, 30)
    finally:
        await maybe_await(client.close())
        rcs = workers.stop()
    lats = [(got[i] - t_enq[i]) * 1000.0 for i in range(a.jobs) if i in got]
    res = {"rate_actual": rate, "latency_n": len(lats), "worker_exit_codes": rcs,
           "enqueue_call_ms_p50": percentile([c * 1000 for c in call_s], 50), **latency_stats(lats)}
    if len(lats) < a.jobs:
        res.update(failed=True, worker_log_tails=workers.tails())
    return res
