"""Pulse's benchmark: the same workloads against Pulse and its peers,
interleaved (A B C A B C ...), repeated, summarized as medians (min–max)
with the ratio Pulse/peer per pair of runs. See bench/README.md.

    python bench/harness.py w1 --jobs 20000 --repeat 3 --peers pulse,pgqueuer-asyncpg,procrastinate
    python bench/harness.py w3 w1 w2      # several workloads, in that order
    python bench/harness.py w6 --repeat 3 --peers pulse-asyncio,pulse-threads,pgqueuer-asyncpg
    python bench/harness.py all
    python bench/harness.py w1 --jobs 50 --repeat 1 --peers pulse --dsn postgresql://…/db

Without --dsn it starts bench/pg.sh's PostgreSQL (port 25432, durable
settings) and gives each config its own bench_* database; with --dsn every
config uses that database (Pulse's tables in it are emptied). pulsed/ is
copied aside at the start and every Pulse run of the invocation uses that
copy. Results go to bench/results/<date>-<workload>.json and .md, and the
table is printed.
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import report
from peers.procs import BENCH_DIR, worker_env

PEER_PYTHON = Path(os.environ.get("BENCH_VENV", "/tmp/benchvenv")) / "bin" / "python"
REPO = BENCH_DIR.parent
# The shared peer benchmark beside this repository: the probe runs from there,
# as it is (a reference, not product code); BENCH_PEERS_DIR to use another copy
SHARED_PEERS = Path(os.environ.get("BENCH_PEERS_DIR", REPO.parent / "shared" / "bench-peers"))
SNAPSHOT = Path(tempfile.mkdtemp(prefix="bench-pulse-src-"))  # see snapshot_product()


@dataclass(frozen=True)
class Config:
    module: str
    args: list[str] = field(default_factory=list)
    peer_venv: bool = True  # run with $BENCH_VENV's python; False: this one (the product's)
    cwd: Path = BENCH_DIR  # where `python -m module` runs (its `peers` package)
    # the driver options it knows (the shared harness's CLI has no W4-W6 options);
    # None: every option of bench/peers/driver.py
    options: frozenset[str] | None = None


CONFIGS = {
    "pulse": Config("peers.pulse_peer", peer_venv=False),
    # the same, but each single-row enqueue is one autocommit statement (PgQueuer's shape)
    "pulse-autocommit": Config("peers.pulse_peer", ["--enqueue-autocommit"], peer_venv=False),
    "pgqueuer": Config("peers.pgqueuer_peer", ["--concurrency", "10"]),
    "pgqueuer-asyncpg": Config("peers.pgqueuer_asyncpg_peer", ["--concurrency", "10"]),
    # the same, but each enqueue inside the application's transaction (Pulse's default shape)
    "pgqueuer-asyncpg-txn": Config("peers.pgqueuer_asyncpg_peer", ["--concurrency", "10",
                                                                  "--enqueue-in-transaction"]),
    "procrastinate": Config("peers.procrastinate_peer", ["--concurrency", "1"]),
    "procrastinate-c10": Config("peers.procrastinate_peer", ["--concurrency", "10"]),
    "celery-redis": Config("peers.celery_peer"),
    # DESIGN.md's throw-away probe: Pulse's fast path alone (forked children,
    # fenced claims of 100 and completions in one statement, every commit
    # fsync'd, done rows moved to a history table). The yardstick for what
    # Pulse's features cost (issue 21); run from ../shared/bench-peers as it is.
    "probe": Config("peers.batched_forking_peer", ["--claim-batch", "100", "--flush", "cte",
                                                   "--mode", "move"], cwd=SHARED_PEERS,
                    options=frozenset({"workers", "rate", "timeout", "poll_interval"})),
    # the probe with Pulse's storage model: finished rows updated in place
    # (state = 'done') instead of moved to a history table
    "probe-inplace": Config("peers.batched_forking_peer", ["--claim-batch", "100", "--flush",
                                                           "cte", "--mode", "inplace"],
                            cwd=SHARED_PEERS,
                            options=frozenset({"workers", "rate", "timeout", "poll_interval"})),
    # Pulse, its done count scanning the whole table at each poll (before
    # session 19): what that poll took from the daemon
    "pulse-scancount": Config("peers.pulse_peer", ["--done-count", "scan"], peer_venv=False),
    # through PgBouncer in transaction mode: workers polling, or LISTENing on listen_url
    "pulse-pgbouncer": Config("peers.pulse_peer", ["--pgbouncer", "poll"], peer_venv=False),
    "pulse-pgbouncer-listen": Config("peers.pulse_peer", ["--pgbouncer", "listen"],
                                     peer_venv=False),
    # W4's two table states, and W5
    "pulse-backlog": Config("peers.pulse_peer", ["--workload", "backlog"], peer_venv=False),
    "pulse-empty": Config("peers.pulse_peer", ["--workload", "backlog", "--available", "0",
                                               "--finished", "0"], peer_venv=False),
    "pulse-mixed": Config("peers.pulse_peer", ["--workload", "mixed"], peer_venv=False),
    # W6: 50 jobs at once per worker process, an `async def` handler on the
    # event loop, or a plain `def` one on 50 threads
    "pulse-asyncio": Config("peers.pulse_peer", ["--concurrency", "50", "--io-handler", "async"],
                            peer_venv=False),
    "pulse-threads": Config("peers.pulse_peer", ["--concurrency", "50", "--io-handler", "sync"],
                            peer_venv=False),
    # W7: POST /jobs to a real pulsed's API (bench/http_enqueue.py)
    "pulse-http": Config("http_enqueue", peer_venv=False),
}


# W6's PgQueuer: `pgq run --batch-size 10 --max-concurrent-tasks 50` in each of
# the 2 processes (its default batch, and its cap on the jobs one process has
# picked, enforced by the dequeue query): 100 at once in all
PGQ_W6 = ["--concurrency", "10", "--max-concurrent-tasks", "50"]


@dataclass(frozen=True)
class Workload:
    driver_workload: str  # peers/driver.py --workload
    jobs: int
    peers: str
    extra: list[str] = field(default_factory=list)
    # a config's settings for this workload only, after (so winning over) its own
    config_args: dict[str, list[str]] = field(default_factory=dict)


WORKLOADS = {
    "w1": Workload("drain", 20000, "pulse,probe,pgqueuer-asyncpg,procrastinate"),
    "w2": Workload("latency", 500, "pulse,probe,pgqueuer-asyncpg,procrastinate"),
    "w4": Workload("backlog", 20000, "pulse-backlog,pulse-empty"),
    "w5": Workload("mixed", 0, "pulse-mixed", ["--workers", "8", "--idle-before", "10"]),
    # 100 jobs at once in all (2 processes of 50), each waiting 50 ms
    "w6": Workload("io", 10000, "pulse-asyncio,pulse-threads,pgqueuer-asyncpg", config_args={
        c: PGQ_W6 for c in ("pgqueuer", "pgqueuer-asyncpg", "pgqueuer-asyncpg-txn")}),
    # HTTP enqueue: 1 client, 32 clients, bulk arrays of 1,000 (bench/http_enqueue.py)
    "w7": Workload("http", 0, "pulse-http"),
}


def server_dsn(config: str, given: str | None) -> str:
    """The database of one config: --dsn, or bench_<config> on pg.sh's server."""
    if given:
        return given
    name = "bench_" + config.replace("-", "_")
    return subprocess.run([str(BENCH_DIR / "pg.sh"), "db", name], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]


def driver_command(config: str, wl: Workload, a: argparse.Namespace, out: Path) -> list[str]:
    c = CONFIGS[config]
    python = str(PEER_PYTHON) if c.peer_venv else sys.executable
    cmd = [python, "-m", c.module, "--workload", wl.driver_workload, "--jobs", str(a.jobs or wl.jobs),
           "--dsn", server_dsn(config, a.dsn), "--out", str(out), *wl.extra]
    for flag in ("workers", "rate", "available", "finished", "duration", "timeout", "single_jobs",
                 "io_ms", "poll_interval"):
        if getattr(a, flag) is not None and (c.options is None or flag in c.options):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
    # last: a config's own settings win (pulse-empty's 0 rows), and its
    # settings for this workload over those
    return cmd + c.args + wl.config_args.get(config, [])


def run_driver(config: str, wl: Workload, a: argparse.Namespace, rep: int) -> dict:
    load_before = os.getloadavg()  # other work on the machine skews a run: keep a trace
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        env = worker_env() if CONFIGS[config].peer_venv else worker_env(
            {"PYTHONPATH": os.pathsep.join([str(BENCH_DIR), str(SNAPSHOT)])})
        proc = subprocess.run(driver_command(config, wl, a, out), cwd=CONFIGS[config].cwd,
                              env=env, capture_output=True, text=True)
        run = json.loads(out.read_text()) if out.exists() else {}
    metrics = run.get("metrics") or {}
    if "startup_s" in metrics:  # the shared harness's name for the drain's start-up
        metrics.setdefault("drain_startup_s", metrics.pop("startup_s"))
    run.update(config=config, rep=rep, exit_code=proc.returncode,
               loadavg_before=load_before, loadavg_after=os.getloadavg())
    if proc.returncode:
        run["stderr_tail"] = proc.stderr[-3000:]
    status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    print(f"  {config} rep {rep}: {status} ({run.get('duration_s', 0):.0f} s)", file=sys.stderr)
    return run


def run_workload(name: str, a: argparse.Namespace) -> tuple[dict, str]:
    wl = WORKLOADS[name]
    configs = (a.peers if a.peers and name in ("w1", "w2", "w6") else wl.peers).split(",")
    if "celery-redis" in configs:
        subprocess.run([str(BENCH_DIR / "redis.sh"), "start"], check=True, stdout=sys.stderr)
    runs = []
    for rep in range(1, a.repeat + 1):
        print(f"== {name} repetition {rep}/{a.repeat}", file=sys.stderr)
        runs += [run_driver(c, wl, a, rep) for c in configs]  # A B C A B C …
    summary = report.summarize(wl.driver_workload, configs, runs)
    return {"configs": configs, "summary": summary, "runs": runs}, report.markdown(
        wl.driver_workload, configs, summary)


def run_ceiling(a: argparse.Namespace) -> tuple[dict, str]:
    import ceiling

    clients = [int(c) for c in a.clients.split(",")]
    runs = []
    for rep in range(1, a.repeat + 1):
        print(f"== w3 repetition {rep}/{a.repeat}", file=sys.stderr)
        runs += [r | {"rep": rep, "loadavg_before": os.getloadavg()} for r in ceiling.run(server_dsn("ceiling", a.dsn), a.jobs or 20000,
                                                      clients, list(ceiling.VARIANTS))]
    summary = report.ceiling_summary(runs)
    return {"summary": summary, "runs": runs}, report.ceiling_markdown(summary)


def snapshot_product() -> str:
    """Copy pulsed/ aside so every run of this invocation measures the same
    code while the repository is being edited; return what was copied."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                              text=True).stdout.strip()
    shutil.copytree(REPO / "pulsed", SNAPSHOT / "pulsed", ignore=shutil.ignore_patterns("__pycache__"))
    # Byte-compiled, as a pip install leaves it: with PYTHONDONTWRITEBYTECODE
    # set (as on this machine) every start-up would compile pulsed/ anew.
    compileall.compile_dir(SNAPSHOT / "pulsed", quiet=1)
    sys.path.insert(0, str(SNAPSHOT))  # W3 reads the snapshot's queries.sql
    changed = git("status", "--porcelain", "--", "pulsed")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if changed else "")


def environment(dsn: str) -> dict:
    import psycopg

    names = ("server_version", "fsync", "synchronous_commit", "full_page_writes", "shared_buffers",
             "max_connections", "max_wal_size", "autovacuum", "wal_level")
    with psycopg.connect(dsn) as c:
        settings = {n: c.execute(f"SHOW {n}").fetchone()[0] for n in names}
    mem = next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"nproc": os.cpu_count(), "mem_gib": round(int(mem) / 2**20, 1), "postgres": settings,
            "python": sys.version.split()[0], "loadavg_at_end": os.getloadavg()}


def save(name: str, data: dict, table: str, a: argparse.Namespace) -> None:
    stem = free_stem(Path(a.results), f"{datetime.date.today():%Y-%m-%d}-{name}")
    data = {"workload": name, "argv": sys.argv[1:], "env": environment(server_dsn("pulse", a.dsn)),
            "pulse_source": a.pulse_source, **data}
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    stem.with_suffix(".md").write_text(f"### {name} ({' '.join(sys.argv[1:])})\n\n{table}")
    print(f"\n### {name}\n\n{table}\nsaved {stem}.json and .md")


def free_stem(results: Path, base: str) -> Path:
    """results/base, or base-2, base-3 … when that run's files exist: a
    second run the same day never overwrites the first."""
    results.mkdir(parents=True, exist_ok=True)
    stem, n = results / base, 1
    while stem.with_suffix(".json").exists() or stem.with_suffix(".md").exists():
        n += 1
        stem = results / f"{base}-{n}"
    return stem


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workloads", nargs="+", choices=["w1", "w2", "w3", "w4", "w5", "w6", "w7", "all"],
                   help="run in the order given, all on one snapshot of pulsed/")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--peers", help="w1/w2/w6: comma-separated configs, the first compared with the others: "
                   + ", ".join(c for c in CONFIGS if c not in ("pulse-backlog", "pulse-empty", "pulse-mixed")))
    p.add_argument("--jobs", type=int, help="N (default: w1/w3/w4 20000, w2 500, w6 10000)")
    p.add_argument("--single-jobs", type=int, help="w1: time the single-row enqueue on this many "
                   "jobs only (default: all N; for N = 500,000 it would take minutes)")
    p.add_argument("--dsn", help="use this database instead of starting bench/pg.sh's server")
    p.add_argument("--workers", type=int, help="worker processes (default 2; w5: 8)")
    p.add_argument("--rate", type=float, help="w2: enqueue rate (default 50/s)")
    p.add_argument("--clients", default="2", help="w3: pgbench client counts, e.g. 2,4,8")
    p.add_argument("--available", type=int, help="w4: available jobs (default 100000)")
    p.add_argument("--finished", type=int, help="w4: completed rows (default 500000)")
    p.add_argument("--duration", type=float, help="w5: seconds of steady load (default 60)")
    p.add_argument("--io-ms", type=float, help="w6: how long each job waits (default 50 ms)")
    p.add_argument("--timeout", type=float, help="per run, s (default 900)")
    p.add_argument("--poll-interval", type=float,
                   help="w1: the done count's poll period, s (default 0.1); start-up's resolution "
                        "(e.g. --jobs 2000 --poll-interval 0.01 to compare start-ups alone)")
    p.add_argument("--results", default=str(BENCH_DIR / "results"), help="output directory")
    return p


def main() -> None:
    a = build_parser().parse_args()
    if not a.dsn:
        subprocess.run([str(BENCH_DIR / "pg.sh"), "start"], check=True, stdout=sys.stderr)
    a.pulse_source = snapshot_product()
    names = ["w1", "w2", "w3", "w4", "w5", "w6"] if "all" in a.workloads else a.workloads
    failed = 0
    try:
        for name in names:
            data, table = run_ceiling(a) if name == "w3" else run_workload(name, a)
            save(name, data, table, a)
            failed += sum(1 for r in data["runs"] if r.get("exit_code"))
    finally:
        shutil.rmtree(SNAPSHOT)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
