"""W7: the HTTP enqueue path, `POST /jobs` against a real pulsed.

    python bench/http_enqueue.py --dsn postgresql://postgres@127.0.0.1:5432/bench_http --out w7.json

Starts `pulsed` (master, scheduler and the API child; no workers, so only
the submission path is measured) on a free loopback port, with its own
empty tables, and from this process (a separate one from the daemon) runs:

- one client on one keep-alive connection: p50/p99 of single `POST /jobs`;
- 32 clients, each on its own keep-alive connection (threads, split over
  CLIENT_PROCS processes so the client's GIL is not what is measured):
  jobs/s and p50/p99; then the same clients on a path with no route (404:
  no database, no handler thread), the HTTP layer's own ceiling;
- bulk: one client posting JSON arrays of 1,000 jobs: jobs/s.

Every answer must be 201 and every job must be in the table at the end, or
the run fails. bench/harness.py runs it as workload w7 (config pulse-http);
it writes {"metrics": {...}} to --out like the peers' driver.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers.procs import Workers  # noqa: E402
from peers.pulse_peer import code_hash, reset  # noqa: E402

CLIENT_PROCS = 2
HEADERS = {"Content-Type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(dsn: str, port: int, logdir: Path) -> Workers:
    import tomli_w

    config = {"database": {"url": dsn},
              "daemon": {"state_dir": str(logdir), "workers": 0, "node_id": "bench-http",
                         "stop_timeout": 5},
              "api": {"enabled": True, "listen": f"127.0.0.1:{port}"}}
    (logdir / "pulse.toml").write_text(tomli_w.dumps(config))
    daemon = Workers([[sys.executable, "-m", "pulsed", "--config", str(logdir / "pulse.toml")]],
                     os.environ.copy(), logdir)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not daemon.any_alive():
            raise RuntimeError("pulsed exited: " + "".join(daemon.tails()))
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return daemon
        except OSError:
            pass
        time.sleep(0.05)  # polling for the port to open: there is nothing to wait on
    daemon.stop()
    raise RuntimeError("pulsed's API did not answer /healthz within 30 s: " + "".join(daemon.tails()))


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[float, bytes]:
    """One POST /jobs; (seconds, response body). Anything but 201 is fatal."""
    started = time.perf_counter()
    conn.request("POST", "/jobs", body, HEADERS)
    resp = conn.getresponse()
    data = resp.read()
    elapsed = time.perf_counter() - started
    if resp.status != 201:
        raise RuntimeError(f"POST /jobs answered {resp.status}: {data[:300]!r}")
    return elapsed, data


def not_found(conn: http.client.HTTPConnection, body: bytes) -> tuple[float, bytes]:
    """GET of a path no route has: the HTTP layer alone (no database, no
    handler thread), for its ceiling. Anything but 404 is fatal."""
    started = time.perf_counter()
    conn.request("GET", "/w7-no-such-path")
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 404:
        raise RuntimeError(f"GET /w7-no-such-path answered {resp.status}: {data[:300]!r}")
    return time.perf_counter() - started, data


def job_body(client: int, n: int) -> bytes:
    return json.dumps({"type": "noop", "payload": {"c": client, "n": n}}).encode()


def single_client(port: int, count: int, client: int = 0, warmup: int = 0,
                  start: threading.Barrier | None = None, call=post) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for n in range(warmup):
        call(conn, job_body(client, -1 - n))
    if start is not None:
        start.wait()
    latencies = [call(conn, job_body(client, n))[0] for n in range(count)]
    conn.close()
    return latencies


def _client_proc(port: int, clients: list[int], count: int, ready, go, out, call) -> None:
    """A process of threads, each one keep-alive client; puts (start, end,
    latencies) on `out` once all are done."""
    results: dict[int, list[float]] = {}
    barrier = threading.Barrier(len(clients) + 1)

    def run(client: int) -> None:
        results[client] = single_client(port, count, client, warmup=5, start=barrier, call=call)

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    ready.put(True)
    go.wait()
    started = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    out.put((started, time.perf_counter(), [x for c in clients for x in results.get(c, [])],
             len(results)))


def many_clients(port: int, clients: int, count: int, call=post) -> dict:
    ctx = multiprocessing.get_context("fork")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    groups = [list(range(p, clients, CLIENT_PROCS)) for p in range(CLIENT_PROCS)]
    procs = [ctx.Process(target=_client_proc, args=(port, g, count, ready, go, out, call))
             for g in groups]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    go.set()
    parts = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    if sum(part[3] for part in parts) != clients or any(p.exitcode for p in procs):
        raise RuntimeError("a client failed (see stderr)")
    # perf_counter is CLOCK_MONOTONIC, the same clock in every process
    wall = max(p[1] for p in parts) - min(p[0] for p in parts)
    latencies = [x for p in parts for x in p[2]]
    return {"jobs_per_s": len(latencies) / wall, **percentiles(latencies)}


def bulk(port: int, requests: int, size: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    bodies = [json.dumps([{"type": "noop", "payload": {"b": r, "n": n}} for n in range(size)]
                         ).encode() for r in range(requests + 1)]
    post(conn, bodies[0])  # warm-up
    started = time.perf_counter()
    for body in bodies[1:]:
        _, data = post(conn, body)
        if len(json.loads(data)) != size:
            raise RuntimeError(f"a bulk POST of {size} jobs answered {len(json.loads(data))}")
    return requests * size / (time.perf_counter() - started)


def bulk_supported(port: int) -> bool:
    """False for a pulsed from before the array form (it answers 400, adding
    nothing): the run then has no bulk figure instead of failing."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/jobs", b"[]", HEADERS)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    if resp.status == 400 and b"must be a JSON object" in body:
        return False
    return True


def percentiles(latencies: list[float]) -> dict:
    ms = sorted(x * 1000 for x in latencies)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50_ms": q[49], "p99_ms": q[98], "max_ms": ms[-1], "requests": len(ms)}


def job_count(dsn: str) -> int:
    with psycopg.connect(dsn) as c:
        return c.execute("SELECT count(*) FROM pulse_jobs").fetchone()[0]


def measure(dsn: str, a: argparse.Namespace) -> dict:
    reset(dsn)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        daemon = start_daemon(dsn, port, Path(a.keep_log or tmp))
        try:
            metrics: dict = {}
            one = percentiles(single_client(port, a.single, warmup=100))
            metrics.update(single_p50_ms=one["p50_ms"], single_p99_ms=one["p99_ms"])
            many = many_clients(port, a.clients, a.per_client)
            metrics.update(clients=a.clients, c32_jobs_per_s=many["jobs_per_s"],
                           c32_p50_ms=many["p50_ms"], c32_p99_ms=many["p99_ms"])
            ceiling = many_clients(port, a.clients, a.per_client, call=not_found)
            metrics.update(c32_404_per_s=ceiling["jobs_per_s"], c32_404_p99_ms=ceiling["p99_ms"])
            bulk_jobs = 0
            if a.bulk and bulk_supported(port):
                metrics["bulk_jobs_per_s"] = bulk(port, a.bulk, a.bulk_size)
                bulk_jobs = (a.bulk + 1) * a.bulk_size
            expected = 100 + a.single + a.clients * (a.per_client + 5) + bulk_jobs
            found = job_count(dsn)
            if found != expected:
                raise RuntimeError(f"{found} jobs in pulse_jobs; {expected} were answered 201")
            return metrics
        finally:
            daemon.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", required=True)
    p.add_argument("--out", help="write {'metrics': ...} here (bench/harness.py)")
    p.add_argument("--single", type=int, default=2000, help="one client's requests")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--per-client", type=int, default=300, help="each concurrent client's requests")
    p.add_argument("--bulk", type=int, default=30, help="bulk requests (0: skip)")
    p.add_argument("--bulk-size", type=int, default=1000)
    p.add_argument("--keep-log", metavar="DIR", help="the daemon's config and log go here "
                   "(kept) instead of a temporary directory")
    # bench/harness.py's common driver arguments; this workload has no use for them
    for ignored in ("--workload", "--timeout", "--workers"):
        p.add_argument(ignored, help=argparse.SUPPRESS)
    p.add_argument("--jobs", type=int, default=0, help="N > 0: a scaled run (harness.py "
                   "--jobs): N single requests, N/clients per client, N/bulk-size arrays")
    a = p.parse_args()
    if a.jobs > 0:
        a.single, a.per_client = a.jobs, max(1, a.jobs // a.clients)
        a.bulk = max(1, a.jobs // a.bulk_size)
    started = time.monotonic()
    try:
        result = {"metrics": measure(a.dsn, a)}
    except Exception as exc:  # noqa: BLE001 - recorded as a failed run, then exit 1
        result = {"metrics": {"failed": True}, "error": repr(exc)}
    result.update(duration_s=time.monotonic() - started, pulse_code=code_hash())
    text = json.dumps(result, indent=2)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    sys.exit(1 if result["metrics"].get("failed") else 0)


if __name__ == "__main__":
    main()
