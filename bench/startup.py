"""Start-up, from `pulsed` exec to the first job's handler: the issue's
"exec to first claim", timed without polling (the handler writes the
wall-clock time it began to a file; the exec time is taken just before
Popen). One job waits before each start; the daemon runs the bench's
config (2 workers, API off) and is stopped after each run.

    .venv/bin/python bench/startup.py --dsn postgresql://bench@127.0.0.1:25432/bench_startup [--runs 9]

Runs a byte-compiled copy of pulsed/ (as a pip install leaves it; this
machine sets PYTHONDONTWRITEBYTECODE, so an editable checkout would
compile at every start). Prints each run and the median with min-max, as
JSON; --import-times adds `python -X importtime`'s heaviest modules.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from peers.procs import Workers, worker_env
from peers.pulse_peer import PulseAdapter, reset

REPO = Path(__file__).resolve().parent.parent


def compiled_copy(tree: Path) -> Path:
    """tree's pulsed/ copied aside and byte-compiled: what the runs import."""
    where = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    shutil.copytree(tree / "pulsed", where / "pulsed", ignore=shutil.ignore_patterns("__pycache__"))
    compileall.compile_dir(where / "pulsed", quiet=1)
    return where


def one_start(dsn: str, env: dict[str, str], timeout: float, backlog: int = 0) -> float:
    """Seconds from exec to the first handler's start (the startup job is
    the first of `backlog` + 1 waiting jobs: the rest are no-op jobs)."""
    reset(dsn)
    mark = Path(tempfile.mkdtemp(prefix="bench-startup-mark-")) / "started"
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("INSERT INTO pulse_jobs (type, state, payload) VALUES ('startup', 'available', %s)",
                  (Jsonb({"file": str(mark)}),))
        if backlog:
            c.execute("INSERT INTO pulse_jobs (type, state, payload) SELECT 'noop', 'available', "
                      "jsonb_build_object('i', i) FROM generate_series(1, %s) i", (backlog,))
            c.execute("VACUUM ANALYZE pulse_jobs")
    ad = PulseAdapter(argparse.Namespace(dsn=dsn, workers=2, concurrency=1))
    commands = ad.worker_commands(2, 1)
    logdir = Path(tempfile.mkdtemp(prefix="bench-startup-log-"))
    exec_at = time.time()
    workers = Workers(commands, env, logdir)
    try:
        deadline = time.monotonic() + timeout
        while not mark.exists() or not mark.read_text():
            if time.monotonic() > deadline or not workers.any_alive():
                raise RuntimeError("no job started: " + "".join(workers.tails()))
            time.sleep(0.002)
        return float(mark.read_text()) - exec_at
    finally:
        workers.stop()


def import_times(env: dict[str, str], n: int = 15) -> list[tuple[int, str]]:
    """`python -X importtime -c 'import pulsed.cli'`'s heaviest modules
    (cumulative microseconds)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import pulsed.cli"],
                         env=env, capture_output=True, text=True).stderr
    rows = []
    for line in out.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _own, cumulative, name = (part.strip() for part in line.split(":", 1)[1].split("|"))
        rows.append((int(cumulative), name))
    return sorted(rows, reverse=True)[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", required=True)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--import-times", action="store_true")
    p.add_argument("--backlog", type=int, default=0,
                   help="no-op jobs waiting behind the startup job (W1 starts behind 20,000)")
    p.add_argument("--tree", type=Path, default=REPO,
                   help="the checkout whose pulsed/ runs (another worktree, to compare two commits)")
    a = p.parse_args()
    code = compiled_copy(a.tree)
    env = worker_env({"PYTHONPATH": os.pathsep.join([str(code), worker_env()["PYTHONPATH"]])})
    one_start(a.dsn, env, a.timeout, a.backlog)  # warm: the server's caches, the OS's page cache
    runs = [round(one_start(a.dsn, env, a.timeout, a.backlog), 3) for _ in range(a.runs)]
    result = {"runs_s": runs, "median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs)}
    if a.import_times:
        result["imports_us"] = import_times(env)
    print(json.dumps(result, indent=1))
    shutil.rmtree(code, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
