"""Whose CPU a drain costs: each pulsed process's (master, scheduler,
workers) and the PostgreSQL backends serving them, read from /proc at the
moment the last job completes, before the stop. The harness's W1 counts
the whole daemon's CPU in one figure; this splits it, which is how the
master's tick per log chunk was found.

    .venv/bin/python bench/process_cpu.py [--jobs 100000] [--rounds 3] \
        [--tree /tmp/worktree] [--dsn postgresql://bench@127.0.0.1:25432/postgres]

Fills a scratch database (bench_process_cpu, dropped at the end) with
--jobs available no-op jobs (bulk SQL), starts `python -m pulsed` from
--tree (default: this checkout; a `git worktree` of another commit measures
that commit), 2 workers at concurrency 1 as the harness's W1, and waits for
the last completion. Rounds alternate with a --jobs 200 run, so each role's
start-up and idle CPU can be taken off: the table shows both, per role, as
medians (min–max) of the rounds. The backends are told apart by their
application_name; "backend: done-count poll" is this script's own count
of completed jobs (every 50 ms), and a backend or autovacuum worker that
exited before the end is not counted. Needs bench/pg.sh's server (or
--dsn) on this machine, to read its processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import tomli_w

from peers.procs import children_titles, cpu_s
from peers.pulse_load import FILL_AVAILABLE
from round_trips import drop, scratch

REPO = Path(__file__).resolve().parent.parent
DATABASE = "bench_process_cpu"
SMALL = 200  # jobs of the start-up-only runs
ROLES = ("master", "scheduler", "worker")
BACKENDS = ("backend: workers", "backend: scheduler", "backend: done-count poll",
            "postgres: other")
POLL_S = 0.05


def prepare(dsn: str, tree: Path, jobs: int) -> None:
    """The tree's schema, emptied, then `jobs` available no-op jobs."""
    subprocess.run([sys.executable, "-c", "import sys, psycopg; from pulsed.db.migrate import "
                    "migrate; migrate(psycopg.connect(sys.argv[1], autocommit=True))", dsn],
                   env=_env(tree), check=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE pulse_jobs RESTART IDENTITY CASCADE")
        conn.execute(FILL_AVAILABLE, {"n": jobs})
        conn.execute("VACUUM ANALYZE pulse_jobs")
        conn.execute("CHECKPOINT")


def _env(tree: Path) -> dict[str, str]:
    bench = REPO / "bench"  # the handlers (peers.pulse_handlers)
    return {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{bench}"}


def _config(dsn: str, state: Path) -> Path:
    path = state / "pulse.toml"
    path.write_text(tomli_w.dumps({
        "database": {"url": dsn},
        "daemon": {"state_dir": str(state), "workers": 2, "node_id": "bench",
                   "stop_timeout": 5},
        "worker": {"handlers": ["peers.pulse_handlers"], "concurrency": 1},
        "api": {"enabled": False},
    }))
    return path


def _role(title: str) -> str:
    for role in ROLES:
        if title.startswith(f"pulsed: {role}"):
            return role
    return "other"


def _postgres_cpu(postmaster: int) -> dict[int, float]:
    """CPU seconds of the server's live processes (the postmaster's children)."""
    out = {}
    for pid in children_titles(postmaster):
        try:
            out[pid] = cpu_s(pid)
        except OSError:
            pass  # it exited meanwhile
    return out


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _backend(application_name: str | None) -> str:
    if application_name == "done-count poll":
        return "backend: done-count poll"
    if application_name and application_name.startswith("pulse worker"):
        return "backend: workers"
    if application_name and application_name.startswith("pulse scheduler"):
        return "backend: scheduler"
    return "postgres: other"


def one_drain(dsn: str, tree: Path, jobs: int) -> dict[str, float]:
    """CPU seconds per role (workers summed) and per kind of backend when
    the last job completed, and the drain's wall time ("seconds")."""
    prepare(dsn, tree, jobs)
    state = Path(tempfile.mkdtemp(prefix="bench-process-cpu-"))
    with psycopg.connect(dsn, autocommit=True) as poll:
        postmaster = _parent(poll.info.backend_pid)  # the server runs on this machine
        postgres_before = _postgres_cpu(postmaster)  # before pulsed connects
        with open(state / "pulsed.log", "wb") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "pulsed", "--config",
                                       str(_config(dsn, state))], env=_env(tree),
                                      cwd=str(tree), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        started = time.perf_counter()
        try:
            while poll.execute("SELECT count(*) FROM pulse_jobs WHERE state = 'completed'"
                               ).fetchone()[0] < jobs:
                if daemon.poll() is not None or time.perf_counter() - started > 300:
                    raise RuntimeError(f"pulsed ended or took too long; see {state}/pulsed.log")
                time.sleep(POLL_S)
            out = {"master": cpu_s(daemon.pid), "seconds": time.perf_counter() - started}
            for pid, title in children_titles(daemon.pid).items():
                role = _role(title)
                out[role] = out.get(role, 0.0) + cpu_s(pid)
            names = dict(poll.execute("SELECT pid, application_name FROM pg_stat_activity"
                                      ).fetchall())
            names[poll.info.backend_pid] = "done-count poll"
            for pid, used in _postgres_cpu(postmaster).items():
                kind = _backend(names.get(pid))
                out[kind] = out.get(kind, 0.0) + used - postgres_before.get(pid, 0.0)
            return out
        finally:
            os.killpg(daemon.pid, 15)
            daemon.wait(30)


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", default="postgresql://bench@127.0.0.1:25432/postgres",
                   help="a server to create the scratch database on")
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tree", type=Path, default=REPO, help="the checkout whose pulsed runs")
    a = p.parse_args()
    dsn = scratch(a.dsn, DATABASE)
    runs: dict[int, list[dict[str, float]]] = {a.jobs: [], SMALL: []}
    try:
        for _ in range(a.rounds):
            for jobs in (a.jobs, SMALL):
                runs[jobs].append(one_drain(dsn, a.tree.resolve(), jobs))
    finally:
        drop(a.dsn, DATABASE)
    print(f"CPU seconds per role, {a.rounds} rounds, tree {a.tree}:")
    print(f"| role | {a.jobs:,} jobs | {SMALL} jobs (start-up) |\n|---|---|---|")
    for role in (*ROLES, *BACKENDS, "seconds"):
        cells = [_cell([run.get(role, 0.0) for run in runs[jobs]]) for jobs in (a.jobs, SMALL)]
        print(f"| {'drain wall (s)' if role == 'seconds' else role} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
